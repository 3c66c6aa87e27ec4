"""From a checkpoint to figures: the evaluator (FID, CLIP score, caption accuracy), reports, run comparison, plots."""
