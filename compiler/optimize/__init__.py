"""The optimizer: measured candidates (`candidates`), how many of each on which GPUs
(`placement/`, CP-SAT), the activation arena (`arena`), weights in host memory (`offload`),
and `compile`, which ties them into a verified plan."""
