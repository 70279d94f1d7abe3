# The DPO component's configs (found by hydra_plugins/mmllm_components): hydra.searchpath=[pkg://components.dpo.conf]
