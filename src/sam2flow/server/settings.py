"""Server settings: defaults, ``SAM2FLOW_*`` environment variables, or command-line flags."""

from __future__ import annotations

from typing import Annotated

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ..engine.prompts import PromptBudget
from ..engine.threads import CLICK_SPIN_S
from ..images import ImageLimits


def _env(field: str, plain: str) -> AliasChoices:
    """A field read from ``SAM2FLOW_<FIELD>`` or from ``plain`` (the name another tool's users know)."""
    return AliasChoices(field, f"SAM2FLOW_{field.upper()}", plain)


class ServerSettings(BaseSettings):
    """Every field can be set as ``SAM2FLOW_<FIELD>`` (e.g. ``SAM2FLOW_API_KEY``, ``SAM2FLOW_PRELOAD=hiera_tiny``)."""

    model_config = SettingsConfigDict(env_prefix="SAM2FLOW_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 9001
    device: str = "auto"
    compile: bool = False  # torch.compile the image encoder at load (slow start, faster embeds)
    backend: str = "auto"  # image encoder: auto (torch: a server answers clicks; or SAM2FLOW_BACKEND), openvino
    dtype: str = "auto"  # auto: bfloat16 where the hardware has it natively, else float32 (float16 on CUDA)
    family: str = "sam2.1"
    preload: Annotated[list[str], NoDecode] = []  # versions loaded at start-up; /readyz waits for them
    checkpoint: str | None = None  # weights for the first preloaded (or default) version
    max_resident_models: int = 2
    max_batch_size: int | None = None  # images embedded together across requests; default 1 on CPU, 4 on GPUs
    max_wait_ms: float = 5.0  # how long the batcher waits for more requests
    # After answering a click the compute thread keeps a CPU busy this long, waiting for the next one
    # (an idle CPU answers it ~10-40 ms later on the VMs measured: engine/threads.py); 0: sleep at once.
    click_spin_ms: float = Field(CLICK_SPIN_S * 1000, ge=0)
    cache_entries: int = 64
    cache_bytes: int = 2 << 30
    max_body_bytes: int = 64 << 20
    max_image_pixels: int = 50_000_000
    min_image_side: int = 4
    max_prompts: int = 512  # per image
    max_request_prompts: int = 2048  # all images and steps of one request together
    allow_url_images: bool = False
    url_max_bytes: int = 20 << 20
    url_timeout_s: float = 10.0  # the whole download
    url_hosts: Annotated[list[str], NoDecode] = []  # hosts that may be fetched even on local/private addresses
    api_key: str | None = None
    automatic_points_per_side: int = 32  # unprompted requests: the point grid (cost grows with its square)
    # The labelling page (GET /): folder mode labels the images of this directory (read-only) ...
    images: str | None = None
    labels: Annotated[list[str], NoDecode] = []  # ... with these classes (also the page's class list) ...
    annotations: str | None = None  # ... saved as you go to this COCO file (default <folder name>.coco.json)
    store: str | None = None  # embedding store ('sam2flow embed'): stored images never run the encoder ...
    store_write: bool = False  # ... and it is read-only unless this is set
    # Label Studio's ML backend (POST /predict): where task images relative to Label Studio are fetched,
    # and its API key (sent as "Authorization: Token ..."); the names Label Studio's own backends read.
    label_studio_url: str | None = Field(None, validation_alias=_env("label_studio_url", "LABEL_STUDIO_URL"))
    label_studio_api_key: str | None = Field(
        None, validation_alias=_env("label_studio_api_key", "LABEL_STUDIO_API_KEY")
    )

    @field_validator("preload", "url_hosts", "labels", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    def image_limits(self) -> ImageLimits:
        """What a request's images may be (``sam2flow.images``: accepted forms, pixels, URLs)."""
        return ImageLimits(
            self.max_image_pixels,
            self.min_image_side,
            self.allow_url_images,
            self.url_max_bytes,
            self.url_timeout_s,
            tuple(self.url_hosts),
        )

    def embed_batch_size(self) -> int:
        """Images the micro-batcher gathers for one encoder run (``max_batch_size`` or the device's default)."""
        from ..engine.engine import default_batch_size

        return self.max_batch_size or default_batch_size(self.device)

    def prompt_budget(self) -> PromptBudget:
        """A fresh count for one request."""
        return PromptBudget(self.max_prompts, self.max_request_prompts)
