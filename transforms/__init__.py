"""Pure torch/numpy building blocks: images, models, attacks, saliency, JPEG, metrics.

Never imports apache_beam, fsspec or pyarrow: every function here works from a notebook.
"""
