"""One gating actor's brain, no Ray: scheduler, paged cache, sampling, the step loop over an expert transport."""
