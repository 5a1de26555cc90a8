"""fairseq ``--user-dir`` plugin for LAWA: lets fairseq's own tools load fairseq checkpoints safely.

    fairseq-train DATA --user-dir bert/lawa_plugin --restore-file checkpoint10.pt ...
    fairseq-validate DATA --user-dir bert/lawa_plugin --path checkpoint10.pt --task masked_lm --batch-size 16

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``, and fairseq 0.12's
``checkpoint_utils.load_checkpoint_to_cpu`` calls it without arguments, so fairseq refuses its own
checkpoints. fairseq imports ``--user-dir`` right after parsing the command line (in every distributed
worker too), before it reads any checkpoint, so registering the few harmless classes those files hold here
keeps safe loading on for the whole process instead of turning it off.

What fairseq checkpoints hold besides tensors and builtins (found with
``torch.serialization.get_unsafe_globals_in_checkpoint`` on files from fairseq-fixed 0.12.3.1, fp32 and
fp16 runs, and from ``python -m lawa_utils average``):

* ``argparse.Namespace`` — ``cfg["model"]`` of architectures registered the pre-hydra way (``roberta_base``
  and the other RoBERTa archs), and ``args`` in checkpoints written before fairseq 0.10 moved to hydra.

Everything else (``cfg`` as plain dicts, ``collections.OrderedDict`` meters, tensors, floats) is on
torch's default allowlist.
"""

import argparse

import torch

FAIRSEQ_SAFE_GLOBALS = [argparse.Namespace]


def register() -> None:
    """Allow :data:`FAIRSEQ_SAFE_GLOBALS` for every ``weights_only`` load in this process (idempotent).

    Runs on import. Call it again before fairseq loads a checkpoint in a process that also used a
    ``torch.serialization.safe_globals(...)`` block: on exit such a block removes its classes from the
    allowlist even if they had been registered before it.
    """
    torch.serialization.add_safe_globals(FAIRSEQ_SAFE_GLOBALS)


register()
