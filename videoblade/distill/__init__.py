"""TDM step distillation: pure functions (`tdm`) and the accelerate trainer (`trainer`)."""
