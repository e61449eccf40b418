"""Facts about the machine: its GPUs (NVML and nvidia-smi), the torch and vLLM stack its image
carries, a service's share of GPU memory, host memory. Read by both sides; imports only
core.common. ``python -m core.host.gpu_stack`` is the provisioning preflight's check."""
