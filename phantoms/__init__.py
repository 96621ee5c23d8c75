"""liverstage.phantoms: the synthetic liver phantom generator behind `liverstage synth`.

It lives outside `liverstage.runtime` on purpose: the scanner-side runtime stages real volumes
and has no business carrying a phantom generator. It needs only numpy and nibabel, so it is part
of the base install and `liverstage synth` works without torch.
"""

from .synth import PHANTOM_NOTE, STAGE_FRACTIONS, Phantom, stage_plan, synth_cohort, synth_patient

__all__ = ["PHANTOM_NOTE", "STAGE_FRACTIONS", "Phantom", "stage_plan", "synth_cohort", "synth_patient"]
