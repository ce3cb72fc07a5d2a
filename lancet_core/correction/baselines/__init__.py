"""Baselines LANCET's IBO is compared with, one module each, all over the shared trainer base.

* ``gradient_ascent`` -- maximise the NLL of P;
* ``npo`` -- Negative Preference Optimization on P (Zhang et al. 2024);
* ``filter_retrain`` -- drop P, re-run SFT from the base model;
* ``human_sft`` -- P's responses replaced by refusals (or the dataset's chosen answer), SFT;
* ``dpo`` -- DPO on the dataset's chosen/rejected pairs (not applicable without them);
* ``random_ibo`` -- IBO with random P and N (ablation of the influence step).
"""

from lancet_core.correction.baselines.dpo import preference_rows, run_dpo
from lancet_core.correction.baselines.filter_retrain import run_filter_retrain
from lancet_core.correction.baselines.gradient_ascent import GradientAscentTrainer, run_gradient_ascent
from lancet_core.correction.baselines.human_sft import HumanSFTTrainer, corrected_responses, run_human_sft
from lancet_core.correction.baselines.npo import NPOTrainer, npo_loss, run_npo
from lancet_core.correction.baselines.random_selection import random_sets, run_random_ibo

__all__ = ["run_gradient_ascent", "run_npo", "run_filter_retrain", "run_human_sft", "run_dpo", "run_random_ibo",
           "GradientAscentTrainer", "NPOTrainer", "HumanSFTTrainer", "npo_loss", "corrected_responses",
           "preference_rows", "random_sets"]
