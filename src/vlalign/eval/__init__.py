"""Evaluation metrics.

- ``vlalign.eval.caption_metrics``: pycocoevalcap BLEU/METEOR/ROUGE-L/CIDEr(/SPICE) the COCO way,
  and rouge-score's ROUGE-1 / ROUGE-L F1 and recall (seed 001).
- ``vlalign.eval.vqa``: VQAv2 soft accuracy with the official answer normalisation.
- ``vlalign.eval.effective_rank``: singular-value curve and effective rank (PT-PEFT).

Submodules are not imported here so that importing one metric does not pull in torch or Java.
"""
