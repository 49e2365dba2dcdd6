"""Several GPUs per image: a worker group's process group (`group`), its denoiser split by context parallelism
(`context`: ring-p2p, or diffusers' Ulysses as the fallback) and its VAE decode split by rows (`split_decode`)."""
