"""Side-by-side benchmark of EVLGen and BLIP-2 (``python -m lavis_evlgen.bench``; README "Performance").

- ``connectors.py``: each variant's connector as a call on ViT tokens (what MACs count), and the
  paper-size connectors built from configs with random weights.
- ``macs.py``: MACs per sample, Linear layers only (the paper's count) and every op (FlopCounterMode).
- ``variants.py``: the rows (``evlgen``, ``evlgen_half``, ``evlgen_cached``, ``blip2_stage1``, ``blip2_stage2``) per size
  and how one training step of each is timed part by part. A new row is one ``Variant`` entry (and a
  ``VariantBench`` subclass when its step differs, e.g. reading cached ViT features).
- ``run.py``: the interleaved measurement, ``bench.json`` and the markdown table, the target ratios.
"""
