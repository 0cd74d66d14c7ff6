"""The only package that imports Ray: actors around the pure cores, device placement, deploy()."""
