"""Valuation: global properties of samples, utilities on coalitions, Shapley estimators."""
