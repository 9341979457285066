"""Certified accuracy: proofs, from a model's circuits, of how often it is right over every input.

For a 1-layer, 1-head, attention-only model of a task whose answer is the max of its inputs
(qkov's ``max``), and each input length ``n``, everything is computed from five float64 tables
of the circuits (:mod:`.tables`: EQKE, EQKP, EVOU, PVOU, EUPU, biases folded):

- :func:`brute_force` (:mod:`.brute`): the exact accuracy over all ``d_vocab ** n`` inputs;
- :func:`cubic` (:mod:`.cubic`, cases from :mod:`.cases`): a certified lower bound from a case
  split by max token, query token, largest non-max token and copies of the max;
- :func:`subcubic` (:mod:`.subcubic`): a cheaper, looser bound that reads EQKE as a rank-one
  "query direction × size direction" part plus a bounded remainder.

A proof's bound never exceeds the exact accuracy: every case it certifies is one where the max
token's logit beats every other by more than a rounding margin, for every input in the case.
:func:`certify` runs them all per length (``qkov.certify``; ``qkov certify DIR`` on the command
line). This room reads weights through :mod:`qkov.circuits` only.

>>> import qkov
>>> task = qkov.get_task("max", vocab=5, min_len=2, max_len=3)
>>> cert = qkov.certify(qkov.Transformer(task.model_config()), task)
>>> sorted(cert.lengths), cert[3].inputs
([2, 3], 125)
"""

from .brute import Exact, brute_force
from .cases import CaseProof, case_counts
from .certificate import EXACT_LIMIT, Certificate, LengthCertificate, certify
from .cubic import cubic
from .subcubic import SubcubicProof, subcubic
from .tables import Tables, check_model, tables

__all__ = [
    "EXACT_LIMIT", "CaseProof", "Certificate", "Exact", "LengthCertificate", "SubcubicProof", "Tables",
    "brute_force", "case_counts", "certify", "check_model", "cubic", "subcubic", "tables",
]
