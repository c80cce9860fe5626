"""synthetic backend: a stand-in scorer for benchmarks and pipeline tests. Its scores are NOT Deita scores.

No model is loaded. The six digit values of a prompt are a fixed function of its token ids (a BLAKE2b
hash of the ids, plus a term that grows with the prompt's length), so a prompt gets exactly the same
values in every run, actor, node, batch and batch position. Everything around the model is real: the
Scorer still loads the tokenizer named by the model path, derives and checks the digit ids, builds and
truncates the prompts and computes the expected score, and the pipeline still plans, reads, validates,
writes and accounts. That makes it the right tool for:

* scale benchmarks of the pipeline itself (the model's cost is taken out, or simulated with
  `seconds_per_prompt`);
* fault-tolerance tests, which need runs whose scores are exactly reproducible whatever the failure
  changed about which actor scored what, and which are cheap to start.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

import numpy as np

from deita_ray.scoring.backends import DigitValues, ScorerBackend

# A prompt's digit values: hash noise in [0, _NOISE] plus a length tilt towards the high digits that
# reaches ±_LENGTH_TILT·2.5 at _LENGTH_SCALE tokens, so longer samples tend to score higher (as a
# real complexity scorer would) and the scores spread over the whole 1..6 range.
_NOISE = 3.0
_LENGTH_TILT = 1.0
_LENGTH_SCALE = 512


def synthetic_digit_values(ids: Sequence[int]) -> list[float]:
    """The six digit logits of one prompt: a pure function of its token ids."""
    # Little-endian int64 explicitly: the same ids hash the same on every machine of a cluster.
    digest = hashlib.blake2b(np.asarray(ids, dtype="<i8").tobytes(), digest_size=6).digest()
    tilt = _LENGTH_TILT * min(len(ids) / _LENGTH_SCALE, 1.0)
    return [_NOISE * byte / 255.0 + tilt * (k - 2.5) for k, byte in enumerate(digest)]


class SyntheticBackend(ScorerBackend):
    """Hash-based digit values (see the module docstring); optional simulated model time."""

    def setup(self) -> None:
        pass  # nothing to load: that is the point

    def digit_values(self, prompts: Sequence[Sequence[int]]) -> list[DigitValues]:
        if self.config.seconds_per_prompt:
            time.sleep(self.config.seconds_per_prompt * len(prompts))
        return [synthetic_digit_values(ids) for ids in prompts]
