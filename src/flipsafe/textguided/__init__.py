"""Text-guided classifiers: class descriptions, text encoders and cosine heads."""

from flipsafe.textguided.describe import (
    BUNDLED_SETS,
    DEFAULT_QUESTIONS,
    DEFAULT_TEMPLATES,
    Descriptions,
    bundled_descriptions,
    canonical_class,
    llm_descriptions,
    load_descriptions,
    save_descriptions,
    template_descriptions,
)
from flipsafe.textguided.embeddings import ClassEmbeddings, load_embeddings, save_embeddings
from flipsafe.textguided.encoders import (
    ENCODER_SPECS,
    CLIPEncoder,
    PrecomputedEncoder,
    SentenceTransformerEncoder,
    TextEncoder,
    encode_classes,
    get_encoder,
)
from flipsafe.textguided.head import (
    HEAD_KINDS,
    CosineHead,
    TextGuidedClassifier,
    classifier_layer_name,
    find_final_linear,
    make_text_guided,
)

__all__ = [
    "BUNDLED_SETS",
    "DEFAULT_QUESTIONS",
    "DEFAULT_TEMPLATES",
    "ENCODER_SPECS",
    "HEAD_KINDS",
    "CLIPEncoder",
    "ClassEmbeddings",
    "CosineHead",
    "Descriptions",
    "PrecomputedEncoder",
    "SentenceTransformerEncoder",
    "TextEncoder",
    "TextGuidedClassifier",
    "bundled_descriptions",
    "canonical_class",
    "classifier_layer_name",
    "encode_classes",
    "find_final_linear",
    "get_encoder",
    "llm_descriptions",
    "load_descriptions",
    "load_embeddings",
    "make_text_guided",
    "save_descriptions",
    "save_embeddings",
    "template_descriptions",
]
