"""DPO (Rafailov et al. 2023) as a research variant: DPOModule and its configs."""
