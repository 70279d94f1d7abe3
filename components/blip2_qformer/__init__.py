"""BLIP-2 stage-1 Q-Former representation pretraining (ITC + ITM + ITG); see README.md."""
