"""Channel groups: which channels of which tensors must be removed together (an ONNX dependency graph).

Model. Every channel a weighted producer creates is an *element* (an integer id). A tensor that carries channels has
a *layout*: the axes that carry them and an integer array ``el`` over those axes giving, for every position, the
element it belongs to (``el.shape == [dim(a) for a in axes]``). Positions of other axes are free (batch, space,
time). Walking the graph once in topological order, each op maps its inputs' layouts to its outputs' layouts and
records which elements must go together (*unions*), which constants must be sliced along which axis, and why an
element can never be removed (*blocks*). After the walk, connected components of the union graph are the
*units* — the smallest sets of channels that can be removed at once — and units whose elements were allocated by
producers that are linked through some unit form a *group* (what a user calls "the channels of conv2 and conv3":
one index set, several tensors).

Rules (X: data input with layout L; a channel axis is an axis in L.axes):

- Producers with constant weights start new elements: Conv/ConvTranspose (group 1) output axis 1, Gemm output axis 1,
  MatMul with a constant 2-D right operand output axis -1. Their weights are sliced on the output axis (and bias);
  their input-side weight axis (Conv W axis 1, ConvTranspose W axis 0, Gemm/MatMul the K axis) is sliced by L.
- A weight read by several of those producers/consumers (tied layers) is one tensor cut once: the elements its
  readers give one position along one axis are unioned (biases equal by chance are not tied: they get copies).
- Depthwise Conv/ConvTranspose (group == C_in, multiplier m): output channel o is input channel o // m; ``group``
  becomes the kept input count. Other grouped convs block their input channels.
- Elementwise ops (unary and broadcasting n-ary: Add/Sub/Mul/Div/Max/Min/Pow/Where/PRelu/comparisons...) union
  their operands' elements position by position (residual connections; the SE gate ``x * s``). A constant operand
  with more than one entry along a channel axis is sliced along it; an operand without a layout but with real
  extent along a channel axis (a graph input, an unprunable tensor) blocks the channels it meets; a channel axis
  broadcast from extent 1 blocks.
- BatchNormalization/InstanceNormalization: per-channel parameters are sliced. LayerNormalization, GroupNorm, LRN,
  MeanVarianceNormalization, Softmax/LogSoftmax/Hardmax and ReduceMean/Max/Min/Prod/LogSumExp over a channel axis
  block (the statistics change when a channel goes); ReduceSum/ReduceSumSquare/ReduceL1/ReduceL2 and the contraction
  of MatMul(activation, activation) over a channel axis are fine (a removed channel is a zero term of the sum).
- MatMul(A, B) of two activations: both operands are broadcast into the virtual product Z[..., M, K, N] and their
  elements unioned there; the output keeps the non-K axes. When a channel layout spans K and another axis (attention:
  heads x head_dim), all K positions of one index of the other axes are unioned: the unit becomes the head.
- Concat on a channel axis concatenates the element arrays (inputs without a layout get fresh, blocked elements);
  Split/Slice (step 1) cut them, and their sizes/starts/ends are recomputed from the kept counts.
- Reshape/Flatten: input and output shapes are decomposed into blocks of consecutive axes with equal products; a
  channel axis is carried through its block in C order (Conv -> Flatten -> Gemm maps channel c to features
  c*HW .. c*HW+HW-1; [B,T,384] -> [B,T,12,32] maps it to a (head, dim) pair). Explicit entries of the target shape on
  channel axes (a constant, or a constant piece of a Concat that builds the shape) become the kept counts.
  Transpose permutes the layout; Squeeze/Unsqueeze renumber it; Gather on a free axis passes it.
- Pooling, Resize/Upsample (scale 1 on channel axes), Pad (no padding on channel axes), Tile (repeat 1), Expand,
  Identity/Dropout/Cast, activations and per-tensor Q/DQ pass channels through (per-axis Q/DQ slices scale/zp).
- Anything else blocks the channels reaching it, with the op named in the reason; so do graph outputs, tensors read
  inside subgraphs, non-constant weights, and layouts whose units depend on more than one axis (the kept positions
  would not form a dense box).

A group is prunable when none of its units is blocked, it has at least two units and a weighted producer.
``ChannelGroups.apply`` slices every recorded constant/attribute for a set of removed units; ``zeroed_model`` zeroes
the same channels' weights instead (same outputs, same shapes: the property the tests check).

Where it lives (modules of this package): ``layout`` (layouts, index maths, union-find), ``walk`` (walk state,
shared rules, dispatch), ``rules_elementwise`` (unary/broadcast ops, norms, reductions), ``rules_weighted``
(Conv/ConvTranspose/Gemm/MatMul), ``rules_index_ops`` (Concat/Split/Slice/Gather), ``rules_shape_ops``
(Transpose/Squeeze/Unsqueeze/Flatten/Reshape/Expand), ``rules_passthrough`` (pooling/Pad/Resize/Tile/Q-DQ),
``edits`` (edit records, the result, the edits it makes), ``analysis`` (the walk joined into units and groups, the
entry points) and ``shapes`` (the static shapes it works at). This package re-exports the public names.
"""
from onnxcompress.analyses.channel_groups.analysis import ChannelGroupsAnalysis, analyse, describe_groups
from onnxcompress.analyses.channel_groups.edits import (
    ChannelGroup,
    ChannelGroups,
    ConstSlice,
    GroupAttrEdit,
    MacTerm,
    RangeEdit,
    ShapeEdit,
    SplitEdit,
)
from onnxcompress.analyses.channel_groups.layout import AxisSpec, Layout, connected_components, reshape_blocks
from onnxcompress.analyses.channel_groups.shapes import (
    input_shapes_for,
    random_feed,
    static_shapes,
)
from onnxcompress.analyses.channel_groups.walk import (
    BROADCAST_OPS,
    OTHER_REDUCTIONS,
    POOL_OPS,
    SHAPE_ONLY_OPS,
    SUM_REDUCTIONS,
    UNARY_OPS,
    toposort,
)

__all__ = [
    "BROADCAST_OPS", "OTHER_REDUCTIONS", "POOL_OPS", "SHAPE_ONLY_OPS", "SUM_REDUCTIONS", "UNARY_OPS", "AxisSpec",
    "ChannelGroup", "ChannelGroups", "ConstSlice", "GroupAttrEdit", "Layout", "MacTerm", "RangeEdit", "ShapeEdit",
    "SplitEdit", "analyse", "ChannelGroupsAnalysis", "connected_components", "describe_groups",
    "input_shapes_for", "random_feed", "reshape_blocks", "static_shapes", "toposort",
]  # fmt: skip
