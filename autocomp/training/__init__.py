"""Training: the baseline (trained once and cached) and the short fine-tuning after compression,
with distillation from the original model (logits and features), regularisers and meProp."""
