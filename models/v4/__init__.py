"""DeepSeek-V4: hybrid compressed attention (sliding window + CSA + HCA), hyper-connections, hash routing.

config.py (ModelConfig fields + V4Extra), rope.py, compressor.py, indexer.py, attention.py, hyper.py,
cache.py (LayerCacheSpecs), model.py (V4DenseModel: the dense part in models/dense.py's contract).
"""
