"""The volume pipeline, one step per module, in the order the data flows:

volume -> slices (:mod:`.run`) -> embeddings (:mod:`.embedding`) -> support prototypes
(:mod:`.support`, :mod:`.contrast`) -> prompts and masks (:mod:`.slice_prompting`) -> where to
start (:mod:`.seed`) -> slice to slice until the structure ends (:mod:`.walk`) -> volume
(:mod:`.run`).  :mod:`.protocols` says which slices a run visits (same volume, another
patient, the evaluation oracle); :mod:`.ring_structures` handles a wall around a cavity;
:mod:`.segmenter` ties them together.
"""
