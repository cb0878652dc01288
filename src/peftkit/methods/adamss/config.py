"""AdamssConfig: field names and defaults as in Hugging Face PEFT 0.21, validated when built."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import PeftConfig, check_bool, check_int, check_number, check_probability


@dataclasses.dataclass
class AdamssConfig(PeftConfig):
    """AdaMSS (adaptive multi-subspaces, OpenReview 8ZdWmpYxT0).

    Args:
        r: R, the rank of the pre-trained weight's SVD basis (clamped to min(r, d_out, d_in [+ 1 with a bias])).
        num_subspaces: K, the clusters of output channels (clamped to d_out); each trains its own update.
        subspace_rank: r_k, the rank of each subspace's update (at most the cluster's size).
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks
            the architecture's query and value projections.
        init_weights: "orthogonal": ``B_k = 0`` (the model starts at the base); None (or False): ``B_k``
            ~ N(0, 0.01^2), an update from the start (tests).
        modules_to_save: modules trained in full and saved with the adapter.
        layers_to_transform / layers_pattern: keep only these layer indices.
        use_asa: adaptive subspace allocation: prune subspaces by importance while training
            (``PeftModel.update_and_allocate(step)`` every step, after backward, before zero_grad).
        asa_target_subspaces: subspaces (over all layers) that keep training once pruning ends.
        init_warmup / final_warmup: the steps between which importance is tracked and the budget falls.
        mask_interval: steps between two pruning decisions.
        asa_importance_beta / asa_uncertainty_beta: moving-average factors of importance and uncertainty.
        asa_schedule_exponent: the budget's decay exponent (1: linear; larger: faster early pruning).
        use_dynamic_rank: r_k per subspace from its singular values above ``svd_threshold`` x the largest.
        svd_threshold: the relative singular-value threshold of ``use_dynamic_rank``.
        random_seed: seed of the randomized SVD, so a file reloads onto the same basis and clusters.
    """

    PEFT_TYPE: ClassVar[str] = "ADAMSS"

    r: int = 100
    num_subspaces: int = 5
    subspace_rank: int = 1
    target_modules: list[str] | str | None = None
    init_weights: str | None = "orthogonal"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    use_asa: bool = False
    asa_target_subspaces: int = 50
    init_warmup: int = 50
    final_warmup: int = 1000
    mask_interval: int = 100
    asa_importance_beta: float = 0.85
    asa_uncertainty_beta: float = 0.85
    asa_schedule_exponent: float = 3.0
    use_dynamic_rank: bool = False
    svd_threshold: float = 0.1
    random_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights is False:  # PEFT's backward-compatible spelling of None
            self.init_weights = None
        self._check(self.init_weights in ("orthogonal", None), "init_weights", "'orthogonal' or None")
        check_int(self, "r", 1)
        check_int(self, "num_subspaces", 1)
        check_int(self, "subspace_rank", 1)
        check_bool(self, "use_asa", "use_dynamic_rank")
        check_probability(self, "asa_importance_beta", closed=True)
        check_probability(self, "asa_uncertainty_beta", closed=True)
        check_number(self, "svd_threshold", minimum=0)
        check_int(self, "random_seed")
        check_int(self, "init_warmup", 0)
        check_int(self, "final_warmup", 0)
        check_int(self, "mask_interval")
        check_int(self, "asa_target_subspaces")
        check_number(self, "asa_schedule_exponent")
        if self.use_asa:  # PEFT checks the schedule only when ASA is on
            check_int(self, "mask_interval", 1)
            check_int(self, "asa_target_subspaces", 1)
            check_number(self, "asa_schedule_exponent", above=0)
            self._check(self.init_warmup < self.final_warmup, "init_warmup",
                        f"an integer < final_warmup={self.final_warmup} (a non-empty pruning window)")
