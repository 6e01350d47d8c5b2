"""The coverage corpus: real architectures, built offline with random weights.

Each :class:`Entry` names a model, its family and its source framework; its builder returns
the model in eval mode (seeded), the example inputs and the export options it needs. The
models are tiny (hidden 32-64, two layers, a vocabulary of a few hundred, 32x32 or 64x64
images) so that one export to every target stays well under two minutes, while keeping the
architecture's own code paths (relative positions, shifted windows, rotary embeddings,
expert routing…) — the point of the corpus is where converters break on them, not the
size. Nothing here downloads: configs are built in code, never ``from_pretrained``.

Builders import torch, transformers and keras inside the function, so listing the corpus
(``python coverage/run.py`` in the parent process) imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Built:
    """What :func:`portable_models.export` is given for one model."""

    model: Any
    example: Any
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Entry:
    name: str
    family: str
    source: str  # "torch" or "keras"
    build: Callable[[], Built]
    #: left out of the default run to keep it well under 90 min with 2 jobs on 2 cores (a
    #: close variant of a default model, or a slow one); ``run.py --only NAME`` runs it
    extra: bool = False


SEED = 0
BATCH, SEQ, VOCAB = 2, 8, 256
#: the example's batch is 2: torch.export specialises a dim whose example size is 1
BATCH_DIM = ("batch", 1, 8)


# -- helpers shared by the transformers builders -------------------------------------------
def _wrap(inner: Any, keys: Sequence[str], outputs: Sequence[str]) -> Any:
    """A module taking the HF keyword arguments ``keys`` as positional tensors and returning
    plain tensors (the ``outputs`` fields of the HF output, a tuple for several): what a user
    wraps an HF model in before exporting it. ``forward`` names its parameters (no
    ``*args``): torch.export matches dynamic shapes to the signature's structure."""
    import torch

    def pick(out: Any) -> Any:
        picked = tuple(out[k] for k in outputs)
        return picked[0] if len(picked) == 1 else picked

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> Any:
            return pick(self.inner(**{keys[0]: x}, return_dict=True))

    class Three(One):
        def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> Any:
            return pick(self.inner(**dict(zip(keys, (a, b, c), strict=True)), return_dict=True))

    wrappers = {1: One, 3: Three}
    if len(keys) not in wrappers:
        raise ValueError(f"no wrapper for {len(keys)} inputs")
    return wrappers[len(keys)]().eval()


def _hf(make: Callable[[], Any], inputs: dict[str, Any], outputs: Sequence[str],
        ranges: dict[str, tuple[float, float]] | None = None) -> Built:
    """Seed, build the HF model (``make``), wrap it; every input's axis 0 is the batch."""
    import torch

    torch.manual_seed(SEED)
    model = _wrap(make().eval(), list(inputs), outputs)
    return Built(model, tuple(inputs.values()), {
        "input_names": list(inputs), "output_names": list(outputs),
        "dynamic_dims": {n: {0: BATCH_DIM} for n in inputs}, "input_ranges": dict(ranges or {})})


def _ids(vocab: int = VOCAB, seq: int = SEQ) -> Any:
    import torch

    return torch.randint(0, vocab, (BATCH, seq), generator=torch.Generator().manual_seed(SEED))


def _image(size: int = 32, channels: int = 3) -> Any:
    import torch

    return torch.rand(BATCH, channels, size, size, generator=torch.Generator().manual_seed(SEED))


def _text(make: Callable[[], Any], outputs: Sequence[str] = ("last_hidden_state",),
          vocab: int = VOCAB) -> Built:
    return _hf(make, {"input_ids": _ids(vocab)}, outputs, {"input_ids": (0, vocab - 1)})


def _pixels(make: Callable[[], Any], outputs: Sequence[str] = ("logits",), size: int = 32) -> Built:
    return _hf(make, {"pixel_values": _image(size)}, outputs, {"pixel_values": (0.0, 1.0)})


#: the shape every small transformer text config shares (BERT-style names)
_BERTISH = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 64, "max_position_embeddings": 64}
#: the shape of every small decoder-only config (Llama-style names)
_LLAMAISH = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
             "use_cache": False}
#: the shape of every small ViT-style vision config
_VITISH = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4, "intermediate_size": 64}


# -- transformers: encoders ----------------------------------------------------------------
def bert() -> Built:
    """Three inputs (ids, attention mask, token types), two outputs (sequence, pooled)."""
    import torch
    import transformers as tf

    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -3:] = 0  # the second row padded
    inputs = {"input_ids": _ids(), "attention_mask": mask, "token_type_ids": torch.zeros_like(mask)}
    return _hf(lambda: tf.BertModel(tf.BertConfig(**_BERTISH)), inputs,
               ("last_hidden_state", "pooler_output"),
               {"input_ids": (0, VOCAB - 1), "attention_mask": (0, 1), "token_type_ids": (0, 1)})


def roberta() -> Built:
    import transformers as tf

    cfg = {**_BERTISH, "pad_token_id": 1}  # position ids derived from the non-pad tokens
    return _text(lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(**cfg, num_labels=3)),
                 ("logits",))


def distilbert() -> Built:
    import transformers as tf

    cfg = tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                              max_position_embeddings=64)
    return _text(lambda: tf.DistilBertModel(cfg))


def albert() -> Built:
    import transformers as tf

    return _text(lambda: tf.AlbertModel(tf.AlbertConfig(**_BERTISH, embedding_size=16)))


def electra() -> Built:
    import transformers as tf

    return _text(lambda: tf.ElectraForTokenClassification(
        tf.ElectraConfig(**_BERTISH, embedding_size=16, num_labels=5)), ("logits",))


def deberta_v2() -> Built:
    """Disentangled attention with relative positions (content-to-position both ways)."""
    import transformers as tf

    cfg = tf.DebertaV2Config(**_BERTISH, relative_attention=True, pos_att_type=["p2c", "c2p"],
                             position_buckets=16, max_relative_positions=32)
    return _text(lambda: tf.DebertaV2Model(cfg))


def mpnet() -> Built:
    import transformers as tf

    return _text(lambda: tf.MPNetModel(tf.MPNetConfig(**_BERTISH, pad_token_id=1)))


def t5_encoder() -> Built:
    """Relative position bias (bucketed), RMS layer norm."""
    import transformers as tf

    cfg = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=16, use_cache=False)
    return _text(lambda: tf.T5EncoderModel(cfg))


def bart_encoder() -> Built:
    import transformers as tf

    cfg = tf.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=1,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=64, use_cache=False)
    return _text(lambda: tf.BartModel(cfg).get_encoder())


def mbart_encoder() -> Built:
    """BART's encoder with pre-layer-norm and a final layer norm (mBART)."""
    import transformers as tf

    cfg = tf.MBartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=1,
                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                         decoder_ffn_dim=64, max_position_embeddings=64, use_cache=False)
    return _text(lambda: tf.MBartModel(cfg).get_encoder())


# -- transformers: decoders (causal LM logits, no cache) -----------------------------------
def gpt2() -> Built:
    import transformers as tf

    cfg = tf.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0, use_cache=False)
    return _text(lambda: tf.GPT2LMHeadModel(cfg), ("logits",))


def gpt_neo() -> Built:
    """Alternating global and local (windowed) attention layers."""
    import transformers as tf

    cfg = tf.GPTNeoConfig(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=32, num_layers=2,
                          num_heads=4, attention_types=[[["global", "local"], 1]], window_size=4,
                          use_cache=False)
    return _text(lambda: tf.GPTNeoForCausalLM(cfg), ("logits",))


def gptj() -> Built:
    """Partial rotary embedding, parallel attention and MLP."""
    import transformers as tf

    cfg = tf.GPTJConfig(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                        use_cache=False)
    return _text(lambda: tf.GPTJForCausalLM(cfg), ("logits",))


def opt() -> Built:
    import transformers as tf

    cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                       num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                       use_cache=False)
    return _text(lambda: tf.OPTForCausalLM(cfg), ("logits",))


def llama() -> Built:
    """Rotary embedding, grouped-query attention, RMS norm, SwiGLU."""
    import transformers as tf

    return _text(lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_LLAMAISH)), ("logits",))


def mistral() -> Built:
    import transformers as tf

    return _text(lambda: tf.MistralForCausalLM(tf.MistralConfig(**_LLAMAISH, sliding_window=4)),
                 ("logits",))


def qwen2() -> Built:
    import transformers as tf

    return _text(lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_LLAMAISH)), ("logits",))


def phi() -> Built:
    """Partial rotary factor, parallel block, dense GELU MLP."""
    import transformers as tf

    cfg = {**_LLAMAISH, "num_key_value_heads": 4, "partial_rotary_factor": 0.5}
    return _text(lambda: tf.PhiForCausalLM(tf.PhiConfig(**cfg)), ("logits",))


def gemma() -> Built:
    """Scaled embeddings, (1 + weight) RMS norm, GeGLU, explicit head_dim."""
    import transformers as tf

    return _text(lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**_LLAMAISH, head_dim=16)), ("logits",))


# -- transformers: mixture of experts ------------------------------------------------------
def mixtral() -> Built:
    """Top-2 routing over 4 experts (data-dependent expert selection)."""
    import transformers as tf

    cfg = tf.MixtralConfig(**_LLAMAISH, num_local_experts=4, num_experts_per_tok=2)
    return _text(lambda: tf.MixtralForCausalLM(cfg), ("logits",))


def qwen2_moe() -> Built:
    """Routed experts plus a gated shared expert."""
    import transformers as tf

    cfg = tf.Qwen2MoeConfig(**_LLAMAISH, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                            shared_expert_intermediate_size=64, decoder_sparse_step=1)
    return _text(lambda: tf.Qwen2MoeForCausalLM(cfg), ("logits",))


# -- transformers: vision transformers -----------------------------------------------------
def vit() -> Built:
    import transformers as tf

    return _pixels(lambda: tf.ViTForImageClassification(tf.ViTConfig(**_VITISH, num_labels=10)))


def deit() -> Built:
    """A class and a distillation token; the two heads averaged."""
    import transformers as tf

    return _pixels(lambda: tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**_VITISH, num_labels=10)))


def beit() -> Built:
    """Relative position bias per layer, layer scale, mean pooling."""
    import transformers as tf

    cfg = tf.BeitConfig(**_VITISH, use_relative_position_bias=True, use_mean_pooling=True, num_labels=10)
    return _pixels(lambda: tf.BeitForImageClassification(cfg))


def dinov2() -> Built:
    """Position embeddings interpolated (bicubic) to the input's patch grid on every call."""
    import transformers as tf

    cfg = tf.Dinov2Config(**_VITISH)
    return _pixels(lambda: tf.Dinov2Model(cfg), ("last_hidden_state", "pooler_output"))


# -- transformers: hierarchical vision -----------------------------------------------------
def swin() -> Built:
    """Shifted windows (roll, window partition), patch merging, relative position bias."""
    import transformers as tf

    cfg = tf.SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                        window_size=4, num_labels=10)
    return _pixels(lambda: tf.SwinForImageClassification(cfg))


def convnext() -> Built:
    """Depthwise 7x7 convolutions, channels-last layer norm, layer scale."""
    import transformers as tf

    cfg = tf.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)
    return _pixels(lambda: tf.ConvNextForImageClassification(cfg))


def poolformer() -> Built:
    """Average pooling as the token mixer, group norm."""
    import transformers as tf

    cfg = tf.PoolFormerConfig(num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[16, 32],
                              patch_sizes=[7, 3], strides=[4, 2], padding=[2, 1], num_labels=10)
    return _pixels(lambda: tf.PoolFormerForImageClassification(cfg))


def segformer_classifier() -> Built:
    """Overlapping patch embeddings, spatial-reduction attention, Mix-FFN (depthwise conv)."""
    import transformers as tf

    return _pixels(lambda: tf.SegformerForImageClassification(_segformer_config()))


def _segformer_config() -> Any:
    import transformers as tf

    return tf.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                              patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                              mlp_ratios=[2, 2], decoder_hidden_size=32, num_labels=5)


# -- transformers: convolutional -----------------------------------------------------------
def resnet() -> Built:
    import transformers as tf

    cfg = tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck",
                          num_labels=10)
    return _pixels(lambda: tf.ResNetForImageClassification(cfg))


def mobilenet_v2_hf() -> Built:
    """Inverted residuals, ReLU6, TF-style "same" padding computed from the input size."""
    import transformers as tf

    cfg = tf.MobileNetV2Config(image_size=32, depth_multiplier=0.35, num_labels=10)
    return _pixels(lambda: tf.MobileNetV2ForImageClassification(cfg))


def regnet() -> Built:
    """Grouped convolutions with squeeze-and-excitation (RegNetY)."""
    import transformers as tf

    cfg = tf.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8,
                          layer_type="y", num_labels=10)
    return _pixels(lambda: tf.RegNetForImageClassification(cfg))


# -- transformers: audio -------------------------------------------------------------------
#: a three-layer feature encoder (stride 20) instead of seven: 1600 samples -> 79 frames
_SPEECH = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
           "conv_dim": (16, 16, 16), "conv_stride": (5, 2, 2), "conv_kernel": (10, 3, 3),
           "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4}


def _waveform(samples: int = 1600) -> Any:
    import torch

    return torch.randn(BATCH, samples, generator=torch.Generator().manual_seed(SEED)) * 0.1


def wav2vec2() -> Built:
    """Conv feature encoder (group norm), weight-normed positional conv, CTC head."""
    import transformers as tf

    cfg = tf.Wav2Vec2Config(**_SPEECH, vocab_size=32)
    return _hf(lambda: tf.Wav2Vec2ForCTC(cfg), {"input_values": _waveform()}, ("logits",))


def hubert() -> Built:
    import transformers as tf

    cfg = tf.HubertConfig(**_SPEECH)
    return _hf(lambda: tf.HubertModel(cfg), {"input_values": _waveform()}, ("last_hidden_state",))


def whisper_encoder() -> Built:
    """Two convolutions over log-mel frames, sinusoidal positions (fixed input length)."""
    import torch
    import transformers as tf

    cfg = tf.WhisperConfig(vocab_size=VOCAB, num_mel_bins=16, d_model=32, encoder_layers=2,
                           encoder_attention_heads=4, decoder_layers=1, decoder_attention_heads=4,
                           encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=50,
                           max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           decoder_start_token_id=1, begin_suppress_tokens=None, use_cache=False)
    mel = torch.randn(BATCH, 16, 100, generator=torch.Generator().manual_seed(SEED))
    return _hf(lambda: tf.WhisperModel(cfg).get_encoder(), {"input_features": mel}, ("last_hidden_state",))


# -- transformers: detection and segmentation ----------------------------------------------
def yolos() -> Built:
    """ViT with detection tokens; class logits and sigmoid boxes."""
    import transformers as tf

    cfg = tf.YolosConfig(**{**_VITISH, "image_size": [32, 32]}, num_detection_tokens=5, num_labels=3)
    return _pixels(lambda: tf.YolosForObjectDetection(cfg), ("logits", "pred_boxes"))


def detr() -> Built:
    """A transformers ResNet backbone (no timm), sine positions, object queries."""
    import transformers as tf

    backbone = tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1],
                               layer_type="basic", out_features=["stage4"])
    cfg = tf.DetrConfig(backbone_config=backbone, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, num_queries=5, num_labels=3)
    return _pixels(lambda: tf.DetrForObjectDetection(cfg), ("logits", "pred_boxes"), size=64)


def segformer_segmentation() -> Built:
    """The all-MLP decode head: per-stage upsampling (bilinear) and fusion."""
    import transformers as tf

    return _pixels(lambda: tf.SegformerForSemanticSegmentation(_segformer_config()), size=64)


# -- Keras applications and layer models ---------------------------------------------------
def _keras_seed() -> Any:
    import keras

    keras.utils.set_random_seed(SEED)
    return keras


def _calibrate_batch_norm(model: Any, data: Any) -> None:
    """Give every BatchNormalization the statistics of its inputs (one training pass with
    momentum 0): with the initial ones, activations of a random deep CNN vanish layer by
    layer and every input gets the same output, a parity check that proves nothing."""
    import keras

    norms = [x for x in model._flatten_layers() if isinstance(x, keras.layers.BatchNormalization)]
    for bn in norms:
        bn.momentum = 0.0
    model(data, training=True)
    for bn in norms:
        bn.momentum = 0.99


def _keras_app(make: Callable[[Any], Any], size: int = 32) -> Built:
    import numpy as np

    keras = _keras_seed()
    model = make(keras)
    rng = np.random.default_rng(SEED)
    _calibrate_batch_norm(model, rng.uniform(-1, 1, (8, size, size, 3)).astype("float32"))
    return Built(model, rng.uniform(-1, 1, (BATCH, size, size, 3)).astype("float32"))


def keras_mobilenet_v2() -> Built:
    return _keras_app(lambda k: k.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3),
                                                           alpha=0.35, classes=10))


def keras_efficientnet_b0() -> Built:
    """Swish, squeeze-and-excitation, the built-in rescaling and normalisation layers."""
    return _keras_app(lambda k: k.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3),
                                                              classes=10))


def keras_resnet50() -> Built:
    return _keras_app(lambda k: k.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10))


def keras_densenet121() -> Built:
    """Concatenation-heavy dense blocks (120 convolutions)."""
    return _keras_app(lambda k: k.applications.DenseNet121(weights=None, input_shape=(32, 32, 3),
                                                           classes=10))


def _keras_seq(body: Callable[[Any, Any], Any], steps: int = 12, features: int = 8) -> Built:
    """A float sequence ``(batch, steps, features)`` through ``body``, a 4-way dense head."""
    import numpy as np

    keras = _keras_seed()
    inp = keras.Input((steps, features), name="seq")
    out = keras.layers.Dense(4, name="scores")(body(keras.layers, inp))
    x = np.random.default_rng(SEED).standard_normal((BATCH, steps, features)).astype("float32")
    return Built(keras.Model(inp, out), x)


def keras_lstm() -> Built:
    return _keras_seq(lambda L, x: L.LSTM(16)(x))


def keras_gru() -> Built:
    return _keras_seq(lambda L, x: L.GRU(16)(x))


def keras_bidirectional_gru() -> Built:
    """Bidirectional over a GRU returning every step (covers GRU too)."""
    return _keras_seq(lambda L, x: L.GlobalAveragePooling1D()(
        L.Bidirectional(L.GRU(8, return_sequences=True))(x)))


def keras_attention() -> Built:
    """Self-attention block: MultiHeadAttention, residual, layer norm, feed-forward."""
    def body(L: Any, x: Any) -> Any:
        h = L.Dense(16)(x)
        h = L.LayerNormalization()(h + L.MultiHeadAttention(num_heads=2, key_dim=8)(h, h))
        h = L.LayerNormalization()(h + L.Dense(16)(L.Dense(32, activation="gelu")(h)))
        return L.GlobalAveragePooling1D()(h)

    return _keras_seq(body)


def keras_conv1d() -> Built:
    return _keras_seq(lambda L, x: L.GlobalMaxPooling1D()(
        L.Conv1D(16, 3, padding="same", activation="relu")(L.Conv1D(16, 5, strides=2)(x))),
        steps=64, features=2)


def keras_text_cnn() -> Built:
    """Integer token ids in (int32): embedding, strided Conv1D, global max pooling."""
    import numpy as np

    keras = _keras_seed()
    inp = keras.Input((16,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(VOCAB, 16)(inp)
    x = keras.layers.Conv1D(16, 3, strides=2, activation="relu")(x)
    model = keras.Model(inp, keras.layers.Dense(3, name="label")(keras.layers.GlobalMaxPooling1D()(x)))
    ids = np.random.default_rng(SEED).integers(0, VOCAB, (BATCH, 16)).astype("int32")
    return Built(model, ids, {"input_ranges": {"tokens": (0, VOCAB - 1)}})


# -- hand-written torch patterns users hit -------------------------------------------------
def _pattern(module: Any, example: dict[str, Any], outputs: Sequence[str],
             extra: dict[str, Any] | None = None, dynamic: bool = True) -> Built:
    """Export options for a hand-written model: names, a dynamic batch on every input."""
    options: dict[str, Any] = {"input_names": list(example), "output_names": list(outputs)}
    if dynamic:
        options["dynamic_dims"] = {n: {0: BATCH_DIM} for n in example}
    return Built(module.eval(), tuple(example.values()), {**options, **(extra or {})})


def _randn(*shape: int, seed: int = SEED) -> Any:
    import torch

    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def bool_masks() -> Built:
    """&, |, ~ on comparison masks; a bool output and a where over the mask."""
    import torch

    class BoolMasks(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            mask = ((x > 0) & (y < 0.5)) | ~(x > y)
            return torch.where(mask, x * 2.0, -y), mask

    return _pattern(BoolMasks(), {"x": _randn(BATCH, 16), "y": _randn(BATCH, 16, seed=1)}, ("picked", "mask"))


def inplace_ops() -> Built:
    """add_, relu_, mul_ and masked_fill_ on an intermediate tensor."""
    import torch

    torch.manual_seed(SEED)

    class InPlace(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            h.add_(0.5).relu_()
            h.masked_fill_(h > 1.0, 1.0)
            return h.mul_(3.0)

    return _pattern(InPlace(), {"x": _randn(BATCH, 16)}, ("y",))


def dynamic_slice() -> Built:
    """x[:, : x.shape[1] - 1] and shifted differences with a dynamic sequence length: the
    slice ends are symbolic (``x.shape[1] // 2`` would make torch.export ask for an even
    length, a constraint of the model, not of the converters)."""
    import torch

    class HalfSlice(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            first = x[:, : x.shape[1] - 1]
            steps = x[:, 1:] - x[:, :-1]
            return first.sum(dim=1) + steps.mean(dim=1) - x[:, -1]

    dims = {"x": {0: BATCH_DIM, 1: ("seq", 3, 32)}}  # seq - 1 >= 2: torch.export guards a length-1 slice
    return _pattern(HalfSlice(), {"x": _randn(BATCH, 10, 4)}, ("y",), {"dynamic_dims": dims})


def multi_io() -> Built:
    """Three inputs of different ranks, two outputs returned as a tuple."""
    import torch

    torch.manual_seed(SEED)

    class MultiIO(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4 + 6, 5)

        def forward(self, image: torch.Tensor, meta: torch.Tensor,
                    scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pooled = self.conv(image).mean(dim=(2, 3))
            logits = self.fc(torch.cat([pooled, meta], dim=1)) * scale
            return logits, pooled

    example = {"image": _randn(BATCH, 3, 16, 16), "meta": _randn(BATCH, 6, seed=1),
               "scale": _randn(BATCH, 1, seed=2)}
    return _pattern(MultiIO(), example, ("logits", "features"))


def dict_outputs() -> Built:
    """A dict of three outputs (names come from the keys)."""
    import torch

    torch.manual_seed(SEED)

    class DictOut(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Linear(8, 16)
            self.cls = torch.nn.Linear(16, 3)
            self.box = torch.nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            h = torch.nn.functional.gelu(self.body(x))
            return {"cls": self.cls(h), "box": self.box(h).sigmoid(), "norm": h.norm(dim=-1)}

    built = _pattern(DictOut(), {"x": _randn(BATCH, 8)}, ())
    built.options.pop("output_names")
    return built


def int_embedding() -> Built:
    """int64 token ids and an int32 position input through two embeddings."""
    import torch

    torch.manual_seed(SEED)

    class TwoEmbeddings(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = torch.nn.Embedding(VOCAB, 16)
            self.pos = torch.nn.Embedding(32, 16)
            self.out = torch.nn.Linear(16, 3)

        def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return self.out((self.tok(tokens) + self.pos(positions.long())).mean(dim=1))

    positions = torch.arange(SEQ, dtype=torch.int32).expand(BATCH, SEQ).contiguous()
    return _pattern(TwoEmbeddings(), {"tokens": _ids(), "positions": positions}, ("scores",),
                    {"input_ranges": {"tokens": (0, VOCAB - 1), "positions": (0, 31)}})


def int_outputs() -> Built:
    """Integer outputs: argmax and topk indices beside the top-k values."""
    import torch

    torch.manual_seed(SEED)

    class TopK(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            scores = self.fc(x)
            values, indices = scores.topk(3, dim=-1)
            return scores.argmax(dim=-1), values, indices

    return _pattern(TopK(), {"x": _randn(BATCH, 8)}, ("best", "top_values", "top_indices"))


def transposed_view() -> Built:
    """Multi-head split and merge: view -> transpose -> matmul -> transpose -> contiguous().view."""
    import torch

    torch.manual_seed(SEED)

    class Heads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = torch.nn.Linear(16, 48)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, s, _ = x.shape
            q, k, v = self.qkv(x).view(b, s, 3, 4, 4).permute(2, 0, 3, 1, 4)
            att = (q @ k.transpose(-2, -1) * 0.5).softmax(dim=-1)
            return (att @ v).transpose(1, 2).contiguous().view(b, s, 16) + x.transpose(1, 2).reshape(b, s, 16)

    return _pattern(Heads(), {"x": _randn(BATCH, SEQ, 16)}, ("y",))


def new_ones_diff_where() -> Built:
    """new_ones, torch.diff, torch.where with a scalar branch, cumsum."""
    import torch

    class Misc(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            d = torch.diff(x, dim=-1)
            d = torch.where(d > 0, d, 0.0)
            ones = x.new_ones(x.shape[0], 1)
            return torch.cat([ones, d.cumsum(dim=-1)], dim=-1) * x

    return _pattern(Misc(), {"x": _randn(BATCH, 12)}, ("y",))


def bicubic_pos_embed() -> Built:
    """A 4x4 grid of position embeddings resized (bicubic, as ViT does at another
    resolution) to the input's patch grid, added to patch embeddings."""
    import torch

    torch.manual_seed(SEED)

    class PosInterp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = torch.nn.Conv2d(3, 16, 4, stride=4)
            self.pos = torch.nn.Parameter(torch.randn(1, 16, 4, 4))
            self.head = torch.nn.Linear(16, 5)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            h = self.patch(image)
            pos = torch.nn.functional.interpolate(self.pos, size=h.shape[-2:], mode="bicubic",
                                                  align_corners=False)
            return self.head((h + pos).flatten(2).mean(dim=-1))

    return _pattern(PosInterp(), {"image": _randn(BATCH, 3, 24, 24)}, ("logits",))


def torch_lstm() -> Built:
    """Two-layer bidirectional LSTM, every step's output and the final hidden state."""
    import torch

    torch.manual_seed(SEED)

    class BiLSTM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = torch.nn.LSTM(8, 16, num_layers=2, batch_first=True, bidirectional=True)

        def forward(self, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out, (h, _) = self.rnn(seq)
            return out, h

    return _pattern(BiLSTM(), {"seq": _randn(BATCH, 10, 8)}, ("steps", "hidden"))


def torch_gru() -> Built:
    import torch

    torch.manual_seed(SEED)

    class GRUTagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = torch.nn.GRU(8, 16, batch_first=True)
            self.out = torch.nn.Linear(16, 4)

        def forward(self, seq: torch.Tensor) -> torch.Tensor:
            return self.out(self.rnn(seq)[0])

    return _pattern(GRUTagger(), {"seq": _randn(BATCH, 10, 8)}, ("tags",))


def length_mask_sdpa() -> Built:
    """A padding mask built from int lengths (arange < lengths), causal SDPA with a mask."""
    import torch

    torch.manual_seed(SEED)

    class Masked(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            keep = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
            causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
            mask = causal[None, None] & keep[:, None, None, :]
            q = self.proj(x).unsqueeze(1)
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
            return out.squeeze(1) * keep[..., None]

    lengths = torch.tensor([SEQ, SEQ - 3])
    return _pattern(Masked(), {"x": _randn(BATCH, SEQ, 16), "lengths": lengths}, ("y",),
                    {"input_ranges": {"lengths": (1, SEQ)}})


def _entries(family: str, source: str, *builders: Callable[[], Built], extra: bool = False) -> list[Entry]:
    return [Entry(f.__name__, family, source, f, extra) for f in builders]


ENTRIES: list[Entry] = [
    *_entries("transformers-encoder", "torch", bert, roberta, albert, deberta_v2, mpnet, t5_encoder,
              bart_encoder),
    *_entries("transformers-decoder", "torch", gpt2, gpt_neo, opt, llama, mistral, phi, gemma),
    *_entries("mixture-of-experts", "torch", mixtral),
    *_entries("vision-transformer", "torch", vit, dinov2),
    *_entries("hierarchical-vision", "torch", swin, convnext),
    *_entries("convolutional", "torch", resnet, mobilenet_v2_hf),
    *_entries("audio", "torch", wav2vec2, whisper_encoder),
    *_entries("detection-segmentation", "torch", yolos, detr, segformer_segmentation),
    *_entries("keras-application", "keras", keras_mobilenet_v2),
    *_entries("keras-layers", "keras", keras_lstm, keras_bidirectional_gru, keras_attention, keras_text_cnn),
    *_entries("torch-patterns", "torch", bool_masks, inplace_ops, dynamic_slice, multi_io, dict_outputs,
              int_embedding, int_outputs, transposed_view, new_ones_diff_where, bicubic_pos_embed,
              torch_lstm, torch_gru, length_mask_sdpa),
    # out of the default run (a transformers model costs 200-370 s here, mostly the converters'
    # own time): close variants of the models above and the slow Keras applications
    # (ResNet50 ~460 s, EfficientNetB0 over 540 s); ``run.py --only NAME`` runs them
    *_entries("transformers-encoder", "torch", distilbert, electra, mbart_encoder, extra=True),
    *_entries("transformers-decoder", "torch", gptj, qwen2, extra=True),
    *_entries("mixture-of-experts", "torch", qwen2_moe, extra=True),
    *_entries("vision-transformer", "torch", deit, beit, extra=True),
    *_entries("hierarchical-vision", "torch", poolformer, segformer_classifier, extra=True),
    *_entries("convolutional", "torch", regnet, extra=True),
    *_entries("audio", "torch", hubert, extra=True),
    *_entries("keras-application", "keras", keras_efficientnet_b0, keras_resnet50, keras_densenet121,
              extra=True),
    *_entries("keras-layers", "keras", keras_gru, keras_conv1d, extra=True),
]

BY_NAME: dict[str, Entry] = {e.name: e for e in ENTRIES}
