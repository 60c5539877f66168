"""Image classifiers that are not transformers models: ``timm:NAME``, ``torchvision:NAME`` and
``package.module:factory`` behind a transformers-like face (:mod:`.classifier`), and images in the
form such a model expects (:mod:`.images`).  Used by :mod:`deltatune.models`; imports only the core."""
