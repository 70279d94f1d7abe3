# Hydra search path of the DPO component: hydra.searchpath=[pkg://components.dpo.conf]
