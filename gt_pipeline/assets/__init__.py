"""Assets grouped by domain: data, kernels, training, reports (one module each)."""
