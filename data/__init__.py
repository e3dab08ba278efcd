"""Data for parameter-golf: the challenge's shard format, downloading the official shards, building
shards from documents, decoding them back, the GPU benchmark set and the embedded offline sample
(`data/sample/`). Command line: `python -m data --help`.
"""
