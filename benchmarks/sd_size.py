"""What a Stable Diffusion 1.5-sized pipeline costs on this machine, measured on models
of its architecture with random weights (real weights cannot be downloaded here; the
cost of a forward pass does not depend on the weights' values). Prints measured
numbers and writes benchmarks/results/sd_size/sd_size.json; it does not pass or fail.

Measured, each --reps times after one warm-up (mean and standard deviation):
  * the UNet's forward pass at batch 1 and 2 (4x64x64 latents: 512x512 images; 77
    tokens of width 768), plain and through the shard bank with two adapters unmerged;
  * one LoRA training step (forward and backward, batch 1) on the adapters a shard
    trains (shards/models.py targets, rank 8), and the process's peak memory;
  * the VAE's decoding of one latent to a 512x512 image, and its encoding;
  * the CLIP text encoder (ViT-L/14's: 12 layers, width 768) on one prompt;
  * parameters and bytes of the UNet and of one adapter.

    python benchmarks/sd_size.py --reps 3
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from peft import get_peft_model
from transformers import CLIPTextConfig, CLIPTextModel

from shards.bank import ShardBank
from shards.models import make_lora_config
from shards.text import TextBatch

RESULTS = Path(__file__).parent / "results" / "sd_size"


def sd15_unet() -> UNet2DConditionModel:
    """Stable Diffusion 1.5's UNet configuration (random weights)."""
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8)


def sd15_vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                         block_out_channels=(128, 256, 512, 512),
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)


def timed(fn, reps: int) -> dict:
    fn()  # warm-up
    values = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        values.append(time.perf_counter() - start)
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if reps > 1 else 0.0,
            "reps": reps}


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def unet_costs(reps: int) -> dict:
    """The UNet's forward passes, a LoRA training step, the bank with two adapters."""
    torch.manual_seed(0)
    out = {}
    unet = sd15_unet().eval().requires_grad_(False)
    out["unet_parameters"] = sum(p.numel() for p in unet.parameters())
    text = torch.randn(2, 77, 768)
    for batch in (1, 2):
        x, t, c = torch.randn(batch, 4, 64, 64), torch.full((batch,), 500), text[:batch]
        with torch.no_grad():
            out[f"unet_forward_b{batch}"] = timed(lambda x=x, t=t, c=c: unet(x, t, c), reps)
        print(f"UNet forward, batch {batch}: {out[f'unet_forward_b{batch}']['mean']:.2f} s")
    out["peak_gb_after_forward"] = peak_gb()

    model = get_peft_model(copy.deepcopy(unet), make_lora_config(8, attention=True))
    adapter = {n: p for n, p in model.named_parameters() if "lora_" in n}
    out["adapter_parameters"] = sum(p.numel() for p in adapter.values())
    for p in adapter.values():
        torch.nn.init.normal_(p, std=1e-3)
    optim = torch.optim.AdamW(adapter.values(), lr=1e-4)
    x1, t1 = torch.randn(1, 4, 64, 64), torch.full((1,), 500)

    def step():
        loss = torch.nn.functional.mse_loss(model(x1, t1, text[:1]).sample, torch.randn_like(x1))
        loss.backward()
        optim.step()
        optim.zero_grad()

    model.train()
    out["lora_train_step_b1"] = timed(step, reps)
    out["peak_gb_after_training"] = peak_gb()
    print(f"LoRA training step, batch 1: {out['lora_train_step_b1']['mean']:.2f} s, "
          f"peak {out['peak_gb_after_training']:.1f} GB")

    states = {}
    for name in ("a", "b"):  # two shards' adapters (random, as a trained one would be)
        states[name] = {"rank": 8, "scale": 1.0, "layers": {}}
        for key, p in adapter.items():
            layer, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
            pair = states[name]["layers"].setdefault(layer, [None, None])
            pair[0 if part.startswith("A") else 1] = torch.randn_like(p) * 1e-3
    bank = ShardBank(unet, states.__getitem__, ["a", "b"], capacity=2,
                     adapters={"targets": sorted(states["a"]["layers"]), "rank": 8})
    x2, t2 = torch.randn(2, 4, 64, 64), torch.full((2,), 500)
    text2 = TextBatch(text, torch.ones(2, 77, dtype=torch.bool), torch.zeros(2, 768))
    bank.evaluate(x2, t2, ["a", "b"], text=text2)  # loads both adapters
    out["bank_two_adapters_b2"] = timed(lambda: bank.evaluate(x2, t2, ["a", "b"], text=text2), reps)
    print(f"shard bank, 2 rows on 2 adapters: {out['bank_two_adapters_b2']['mean']:.2f} s")
    return out


def vae_and_text_costs(reps: int) -> dict:
    out = {}
    vae = sd15_vae().eval().requires_grad_(False)
    out["vae_parameters"] = sum(p.numel() for p in vae.parameters())
    with torch.no_grad():
        out["vae_decode_b1"] = timed(lambda: vae.decode(torch.randn(1, 4, 64, 64)), reps)
        out["vae_encode_b1"] = timed(lambda: vae.encode(torch.randn(1, 3, 512, 512)), reps)
    print(f"VAE decode {out['vae_decode_b1']['mean']:.2f} s, encode {out['vae_encode_b1']['mean']:.2f} s")
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12,
                                        max_position_embeddings=77)).eval()
    out["text_parameters"] = sum(p.numel() for p in clip.parameters())
    ids = torch.randint(0, 49408, (1, 77))
    with torch.no_grad():
        out["text_encode"] = timed(lambda: clip(input_ids=ids), reps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    out = {"threads": torch.get_num_threads(), **unet_costs(args.reps),
           **vae_and_text_costs(args.reps), "peak_gb": peak_gb()}
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sd_size.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
