"""The pre-LayerNorm Transformer encoder shared by every tower.

One block is: x + Attention(LN(x)), then x + MLP(LN(x)) (Xiong et al., 2020),
the layout ViT, CLIP and SigLIP all use. Towers differ only in how tokens
come in (patches, words, spectrogram patches) and how they are pooled.

Every module computes in `dtype` (bfloat16 for speed) while its parameters stay
float32, and every parameter carries logical axis names for FSDP: "embed" (the
residual width), "mlp", "heads", "kv" (head dim), "vocab", "layers" (the scan
axis), "proj" (the projection's output) or None. `sharding.py` maps those names
onto the mesh; without its rules they are inert.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

# Which activations the backward pass may keep instead of recomputing; config key -> policy.
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep everything
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

Dtype = Any

# The MLP's nonlinearity; config key -> function. Flax's default and big_vision's is the
# tanh approximation of GELU; open_clip's nn.GELU is exact; OpenAI's first CLIPs used
# QuickGELU, x * sigmoid(1.702 x) (the "-quickgelu" open_clip models).
ACTIVATIONS = {
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu": functools.partial(nn.gelu, approximate=False),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
}


def partitioned(initializer, *names):
    """`initializer` whose parameter carries one logical axis name (or None) per dimension."""
    return nn.with_logical_partitioning(initializer, names)


def layer_norm(dtype: Dtype, name: str, epsilon: float = 1e-6,
               recompute: bool = False) -> nn.LayerNorm:
    """A LayerNorm over the residual width; its statistics are float32 whatever `dtype` is.
    `epsilon`: flax's and big_vision's 1e-6; torch's (open_clip's) is 1e-5. `recompute`:
    the backward pass recomputes it from its input instead of keeping its output and
    statistics (see EncoderBlock)."""
    return (nn.remat(nn.LayerNorm) if recompute else nn.LayerNorm)(
        epsilon=epsilon,
        dtype=dtype,
        scale_init=partitioned(nn.initializers.ones, "embed"),
        bias_init=partitioned(nn.initializers.zeros, "embed"),
        name=name,
    )


class AttentionProjection(nn.Module):
    """einsum(x, kernel) + bias: attention's q/k/v ([W] -> [heads, kv]) and output ([heads, kv] -> [W]).

    Flax's DenseGeneral initialises such a kernel on a flattened 2-D shape and unboxes it
    before reshaping, which applies the 3-name logical constraint to a rank-2 array whenever
    a mesh is active; and Linen re-runs initializers under eval_shape in every `apply` to
    check shapes, so every sharded step would fail. Here the kernel is made at its true shape.
    """

    equation: str  # e.g. "btw,whk->bthk"
    kernel_shape: tuple[int, ...]
    kernel_names: tuple
    fan_in_axes: tuple[int, ...]  # the kernel axes that contract with x
    bias_names: tuple  # the bias spans the kernel's trailing len(bias_names) axes
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        fan_out_axes = tuple(i for i in range(len(self.kernel_shape)) if i not in self.fan_in_axes)
        kernel_init = nn.initializers.lecun_normal(in_axis=self.fan_in_axes, out_axis=fan_out_axes)
        kernel = self.param("kernel", partitioned(kernel_init, *self.kernel_names), self.kernel_shape)
        bias_shape = self.kernel_shape[len(self.kernel_shape) - len(self.bias_names) :]
        bias = self.param("bias", partitioned(nn.initializers.zeros, *self.bias_names), bias_shape)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return jnp.einsum(self.equation, x, kernel) + bias


def attention_implementation(dtype) -> str:
    """Which attention `dot_product_attention` runs for this platform and dtype: cuDNN's
    fused (flash) kernel on NVIDIA GPUs in bf16/fp16, which never materialises the
    [B, heads, T, T] weights; `heads_major_attention` elsewhere (TPU fuses it itself;
    CPU; float32)."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if half and jax.default_backend() == "gpu" else "heads_major"


def heads_major_attention(query, key, value, *, causal: bool = False, key_lengths=None):
    """softmax(q k^T / sqrt(d)) v for [B, T, heads, d] inputs, with the heads moved next to
    the batch for the two products ([B, heads, T, d]), so that each is a plain batched
    matmul. Why: XLA:CPU runs products whose batch axes are not leading (as
    jax.nn.dot_product_attention's XLA path writes them, 'BTNH,BSNH->BNTS') at 20-50
    GFLOP/s against 200-300 for these; the text tower's attention, forward and backward,
    took 23 ms a layer that way and 12 ms this way (ViT-Ti widths, batch 64).

    The logits and softmax are float32, weights x values runs in the inputs' dtype, as
    jax.nn.dot_product_attention does. Masked keys (after `key_lengths` [B], or after the
    query under `causal`) get no weight; a query with no key left attends uniformly.
    """
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))  # [B, heads, T, d]
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(query.shape[-1] ** -0.5)
    keep = jnp.ones(logits.shape[-2:], bool)
    if causal:
        keep = jnp.tril(keep)  # query i sees keys 0..i (self-attention: Tq == Tk)
    if key_lengths is not None:
        keep = keep & (jnp.arange(k.shape[2]) < key_lengths[:, None, None, None])
    logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", weights, v), 1, 2)  # [B, Tq, heads, d]


def dot_product_attention(query, key, value, *, causal: bool = False, key_lengths=None):
    """[B, Tq, heads, d] attention of query over key/value ([B, Tk, heads, d]) by the
    platform's best implementation (`attention_implementation`)."""
    if attention_implementation(query.dtype) == "cudnn":
        return jax.nn.dot_product_attention(query, key, value, is_causal=causal,
                                            key_value_seq_lengths=key_lengths,
                                            implementation="cudnn")
    return heads_major_attention(query, key, value, causal=causal, key_lengths=key_lengths)


class MultiHeadAttention(nn.Module):
    """Multi-head dot-product attention, parameters laid out as flax's MultiHeadDotProductAttention:
    query/key/value kernels [W, heads, kv] with [heads, kv] biases, out kernel [heads, kv, W].

    `causal`: each query sees the keys at or before its position. `key_lengths` [B]:
    each example's keys past its length are padding and are not attended to. The
    softmax is float32 and weights x values runs in the compute dtype, on every path.
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    causal: bool = False

    @nn.compact
    def __call__(self, inputs_q, inputs_kv, key_lengths=None):
        # inputs_q: [B, Tq, W]; inputs_kv: [B, Tk, W]; key_lengths: [B] int32 or None.
        width = inputs_q.shape[-1]
        heads = (self.num_heads, width // self.num_heads)

        def split_heads(name, x):  # [B, T, W] -> [B, T, heads, kv]
            return AttentionProjection(
                equation="btw,whk->bthk",
                kernel_shape=(width, *heads),
                kernel_names=("embed", "heads", "kv"),
                fan_in_axes=(0,),
                bias_names=("heads", "kv"),
                dtype=self.dtype,
                name=name,
            )(x)

        query = split_heads("query", inputs_q)
        key, value = split_heads("key", inputs_kv), split_heads("value", inputs_kv)
        y = dot_product_attention(query, key, value, causal=self.causal,
                                  key_lengths=key_lengths)  # [B, Tq, heads, kv]
        return AttentionProjection(
            equation="bthk,hkw->btw",
            kernel_shape=(*heads, width),
            kernel_names=("heads", "kv", "embed"),
            fan_in_axes=(0, 1),
            bias_names=("embed",),
            dtype=self.dtype,
            name="out",
        )(y)


class MlpBlock(nn.Module):
    """Two dense layers with an activation (an ACTIVATIONS key) between them.
    `recompute_activation`: the backward pass recomputes the activation from fc1's output
    instead of keeping its intermediates (GELU's tanh; see EncoderBlock)."""

    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    activation: str = "gelu_tanh"
    recompute_activation: bool = False

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        # x: [B, T, W] -> [B, T, W], through [B, T, mlp_dim].
        width = x.shape[-1]
        kernel_init = nn.initializers.lecun_normal()
        x = nn.Dense(
            self.mlp_dim,
            dtype=self.dtype,
            kernel_init=partitioned(kernel_init, "embed", "mlp"),
            bias_init=partitioned(nn.initializers.zeros, "mlp"),
            name="fc1",
        )(x)
        activation = ACTIVATIONS[self.activation]
        x = (jax.checkpoint(activation) if self.recompute_activation else activation)(x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        return nn.Dense(
            width,
            dtype=self.dtype,
            kernel_init=partitioned(kernel_init, "mlp", "embed"),
            bias_init=partitioned(nn.initializers.zeros, "embed"),
            name="fc2",
        )(x)


class EncoderBlock(nn.Module):
    """One pre-LN Transformer block: self-attention then MLP, each residual.

    `deterministic` is an attribute rather than a call argument so that it stays a
    Python bool under `nn.remat` and `nn.scan`. The call returns (x, None), the
    (carry, per-step output) pair `nn.scan` expects of its body.

    `recompute_elementwise`: the backward pass recomputes both LayerNorms and the MLP's
    activation from their inputs, which it keeps anyway, instead of keeping their
    outputs; the Encoder sets it when no remat policy decides. Measured on CPU (ViT-Ti
    CLIP, batch 64; docs/benchmarks.md): 19% less temporary memory and a 6-8% faster
    step, as fewer [B, T, W] and [B, T, mlp] buffers are written and read back.
    """

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    causal: bool = False
    deterministic: bool = True
    activation: str = "gelu_tanh"
    layer_norm_epsilon: float = 1e-6
    recompute_elementwise: bool = False

    @nn.compact
    def __call__(self, x, key_lengths: Optional[jnp.ndarray]):
        # x: [B, T, W]; key_lengths: [B] (the rest of each row is padding) or None.
        norm = functools.partial(layer_norm, self.dtype, epsilon=self.layer_norm_epsilon,
                                 recompute=self.recompute_elementwise)
        y = norm("ln_attention")(x)
        y = MultiHeadAttention(self.num_heads, self.dtype, self.causal, name="attention")(
            y, y, key_lengths)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=self.deterministic)
        x = x + y
        y = norm("ln_mlp")(x)
        y = MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, self.activation,
                     self.recompute_elementwise, name="mlp")(y, deterministic=self.deterministic)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=self.deterministic)
        x = nn.with_logical_constraint(x + y, ("batch", "length", "embed_act"))
        return x, None


class Encoder(nn.Module):
    """A stack of `depth` encoder blocks followed by a final LayerNorm.

    `remat` (a REMAT_POLICIES key) recomputes each block's activations in the
    backward pass, saving memory. `scan_layers` runs the blocks as one `nn.scan`
    over parameters stacked on a leading "layers" axis: one block to compile
    instead of `depth`. Parameters: `block0`..`block{depth-1}`, or `blocks` when scanned.
    """

    depth: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan_layers: bool = False
    causal: bool = False  # each token attends to itself and the tokens before it
    activation: str = "gelu_tanh"  # an ACTIVATIONS key
    layer_norm_epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x, key_lengths=None, *, deterministic: bool = True):
        # x: [B, T, W] -> [B, T, W]; key_lengths: [B] (real tokens, then padding) or None.
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; use one of {tuple(REMAT_POLICIES)}")
        block = EncoderBlock
        if self.remat != "none":
            # Inside a scan the loop already keeps XLA from merging the recomputation away.
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)
        settings = dict(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            causal=self.causal,
            deterministic=deterministic,
            activation=self.activation,
            layer_norm_epsilon=self.layer_norm_epsilon,
            recompute_elementwise=self.remat == "none",  # a remat policy decides otherwise
        )
        if self.scan_layers:
            blocks = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,  # every block sees the same key lengths
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = blocks(**settings, name="blocks")(x, key_lengths)
        else:
            for i in range(self.depth):
                x, _ = block(**settings, name=f"block{i}")(x, key_lengths)
        return layer_norm(self.dtype, "ln_final", self.layer_norm_epsilon)(x)


def tower_encoder(tower: nn.Module) -> Encoder:
    """The Encoder of a tower module (ViT, text, audio), from its depth, heads, MLP width,
    dropout, dtype, remat and scan settings, activation and LayerNorm epsilon (and
    `causal`, if the tower has it); create it inside the tower's compact method."""
    return Encoder(
        tower.depth,
        tower.num_heads,
        tower.mlp_dim,
        tower.dropout_rate,
        dtype=tower.dtype,
        remat=tower.remat,
        scan_layers=tower.scan_layers,
        causal=getattr(tower, "causal", False),
        activation=tower.activation,
        layer_norm_epsilon=tower.layer_norm_epsilon,
        name="encoder",
    )


class AttentionPool(nn.Module):
    """Multihead attention pooling ("MAP", Lee et al. 2019): a learned query attends over tokens."""

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    activation: str = "gelu_tanh"
    layer_norm_epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x, key_lengths=None):
        # x: [B, T, W] -> [B, W]; key_lengths: [B] (real tokens, then padding) or None.
        batch, _, width = x.shape
        probe = self.param(
            "probe", partitioned(nn.initializers.xavier_uniform(), None, None, "embed"), (1, 1, width)
        )
        probe = jnp.broadcast_to(probe, (batch, 1, width)).astype(self.dtype)  # [B, 1, W]
        pooled = MultiHeadAttention(self.num_heads, self.dtype, name="attention")(probe, x, key_lengths)
        y = layer_norm(self.dtype, "ln", self.layer_norm_epsilon)(pooled)
        mlp = MlpBlock(self.mlp_dim, dtype=self.dtype, activation=self.activation, name="mlp")
        pooled = pooled + mlp(y, deterministic=True)
        return pooled[:, 0]


def map_head(tower: nn.Module) -> AttentionPool:
    """The attention pooling of a tower module, with its heads, MLP width, dtype,
    activation and LayerNorm epsilon; create it inside the tower's compact method."""
    return AttentionPool(tower.num_heads, tower.mlp_dim, tower.dtype, tower.activation,
                         tower.layer_norm_epsilon, name="map_head")
