"""``cluster``: weight sharing with codebook storage that really shrinks the file (``Cluster``).

- ``cluster_pass``: the pass — options, statistics, the per-tensor loop;
- ``candidates``: the weight tensors clustered, and the reason each other one is left alone;
- ``gram_rows``: more calibration feeds for the Gram of a layer whose feeds give few rows (tokens);
- ``vector_codebook`` / ``hot_rows``: product-quantized embedding tables, residual stages on the rows read most;
- ``matrix_vector``: vector codes with GPTQ error feedback for MatMul / Gemm / Conv weights;
- ``half_books``: codebooks and channel scales in float16 where the rounding is cheap;
- ``kmeans1d``: exact 1-D (weighted) k-means by Lloyd on sorted values, vectorised over rows;
- ``cluster_tensor``: one tensor: rows, element weights, k-means, refit, storage choice;
- ``obs_assign``: assignment with error feedback through the layer's inverse Gram (GPTQ with a codebook);
- ``refine``: refit, channel scales and re-assignment alternated in the layer's output metric;
- ``storage``: bit packing and the integer decode subgraph (codebook + indices -> Gather -> Reshape);
- ``layouts``: a weight's channel axis, matrix view and design rows in its consumer.
"""

from onnxcompress.passes.cluster.cluster_pass import Cluster

from onnxcompress.codebook_refit import refit_codebook

__all__ = ["Cluster", "refit_codebook"]
