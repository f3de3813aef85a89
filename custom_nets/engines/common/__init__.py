"""Engine pieces every stage shares: the training-step protocol, the stage exporter, resume, distributed handlers, EMA, schedules, inference outputs."""
