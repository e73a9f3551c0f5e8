"""The outer layer: the `cdm` command line and (later) the BentoML service. A thin
adapter over `shards` and `valuation`; no algorithm lives here."""
