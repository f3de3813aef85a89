"""Engine pieces every stage shares: the training-step outputs, resume, distributed handlers, EMA, schedules, inference outputs."""
