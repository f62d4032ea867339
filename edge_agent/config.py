"""Device profiles: ``firmware_configs/<profile>.toml`` loaded into frozen dataclasses.

A profile describes one kind of edge box (Jetson Orin Nano, AGX Orin, x86 CPU, x86 + GPU):
its DICOM identity, spool, de-identification options, and — parsed and validated here,
consumed by later stages — per-modality preprocessing, inference, MQTT and outbox settings.
Profiles hold no secrets, only paths to key files. Relative paths are resolved against a
base directory chosen at load time (the agent's state directory), so one profile serves a
device (``/var/lib/medchain``) and a test (a temporary folder) alike.

Every field is checked: a missing or mistyped field, an unknown key (a typo) or a value out
of range raises :class:`ConfigError` naming the file, section and field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from edge_agent.errors import ConfigError
from medchain.settings import Section, read_toml

__all__ = [
    "Profile",
    "DeviceConfig",
    "DicomConfig",
    "SpoolConfig",
    "Region",
    "BurnedInPolicy",
    "DeidConfig",
    "PreprocessConfig",
    "InferenceConfig",
    "TlsConfig",
    "MqttConfig",
    "OutboxConfig",
    "RecordsConfig",
    "load_profile",
    "parse_profile",
    "PROFILE_DIR",
    "profile_path",
]

PROFILE_DIR = Path(__file__).resolve().parent.parent / "firmware_configs"

MODALITIES = ("CT", "MR", "CR", "DX", "MG", "US")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area")
DENOISERS = ("none", "gaussian", "nlm")
PRECISIONS = ("fp32", "fp16", "int8")
KNOWN_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
    "OpenVINOExecutionProvider",
    "ROCMExecutionProvider",
)


@dataclass(frozen=True)
class DeviceConfig:
    id: str
    site: str
    group: str
    key: Path | None = None  # the device's Ed25519 signing key (mode 0600)


@dataclass(frozen=True)
class DicomConfig:
    ae_title: str
    port: int
    host: str
    allowed_calling_aets: tuple[str, ...]  # ("*",) accepts any calling AE title
    max_pdu: int
    max_associations: int

    @property
    def accepts_any_caller(self) -> bool:
        return "*" in self.allowed_calling_aets


@dataclass(frozen=True)
class SpoolConfig:
    dir: Path
    max_bytes: int


@dataclass(frozen=True)
class Region:
    """A rectangle in pixel coordinates (columns x, rows y) to blank in every frame."""

    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True)
class BurnedInPolicy:
    action: str  # "quarantine" | "blank" (exactly the text found, and the configured regions)
    regions: tuple[Region, ...]
    # modalities that burn text into pixels unless they say Burned In Annotation = NO
    suspect_modalities: tuple[str, ...]
    # look for text in the pixels of every image (edge_agent.textdetect), flag or no flag
    detect_text: bool = True


@dataclass(frozen=True)
class DeidConfig:
    retain_longitudinal_modified_dates: bool
    retain_patient_characteristics: bool
    patient_id_issuer: str  # issuer used when an instance carries no Issuer of Patient ID
    secret_path: Path | None
    burned_in: BurnedInPolicy
    clean_descriptors: bool = False
    # Retain Safe Private Option: (private creator, element byte) pairs kept
    safe_private: frozenset[tuple[str, int]] = frozenset()
    # "allow-list" (default) or "keep-unlisted": the deny-list reading for research sites
    mode: str = "allow-list"
    # encapsulated documents (PDF, CDA, STL, OBJ, MTL): "quarantine" (default) or "dummy"
    # (forwarded with the document body replaced by the profile's dummy, as Table E.1-1 says)
    documents: str = "quarantine"


@dataclass(frozen=True)
class PreprocessConfig:
    modality: str
    target_size: tuple[int, int]  # rows, columns
    interpolation: str
    window: tuple[float, float]  # intensity window (low, high) before scaling to [0, 1]
    denoise: str


@dataclass(frozen=True)
class InferenceConfig:
    execution_providers: tuple[str, ...]
    threads: int
    precision: str
    batch: int
    models_dir: Path  # verified releases, one folder per model hash, and current.json


@dataclass(frozen=True)
class TlsConfig:
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class MqttConfig:
    host: str
    port: int
    keepalive: int
    max_message_bytes: int
    tls: TlsConfig | None


@dataclass(frozen=True)
class OutboxConfig:
    path: Path
    max_bytes: int
    max_count: int
    min_disk_free_bytes: int = 64 * 1024**2


@dataclass(frozen=True)
class UplinkConfig:
    window: int = 32
    resend_after_s: float = 30.0
    heartbeat_s: float = 30.0


@dataclass(frozen=True)
class CloudConfig:
    # written by `medchain cloud enroll`: the cloud's public keys for this device
    enrollment: Path | None = None


@dataclass(frozen=True)
class RecordsConfig:
    path: Path


@dataclass(frozen=True)
class Profile:
    name: str
    device: DeviceConfig
    dicom: DicomConfig
    spool: SpoolConfig
    deid: DeidConfig
    preprocess: Mapping[str, PreprocessConfig]
    inference: InferenceConfig
    mqtt: MqttConfig
    outbox: OutboxConfig
    records: RecordsConfig
    uplink: UplinkConfig = UplinkConfig()
    cloud: CloudConfig = CloudConfig()
    source: Path | None = field(default=None, compare=False)


def profile_path(name: str) -> Path:
    """The path of a bundled profile by name (``x86-cpu`` -> ``firmware_configs/x86-cpu.toml``)."""
    return PROFILE_DIR / f"{name}.toml"


def load_profile(path: str | Path, base_dir: str | Path | None = None) -> Profile:
    """Read and validate a profile file; relative paths resolve against ``base_dir`` (default:
    the current directory)."""
    path = Path(path)
    raw = read_toml(path, ConfigError, "profile")
    return parse_profile(raw, name=path.stem, base_dir=base_dir, source=path)


def _section(origin: str, name: str, table: Any, base: Path) -> Section:
    return Section(origin, name, table, base, ConfigError)


def _ae_title(sec: Section, key: str, value: str) -> str:
    if len(value) > 16 or not value.isascii() or "\\" in value or not value.strip():
        raise sec._fail(key, f"AE title must be 1-16 ASCII characters without backslash; got {value!r}")
    return value.strip()


def _regions(sec: Section) -> tuple[Region, ...]:
    regions = []
    for i, r in enumerate(sec.list("regions", list, [])):
        if len(r) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in r):
            raise sec._fail(f"regions[{i}]", "expected [x, y, width, height] of non-negative integers")
        if r[2] == 0 or r[3] == 0:
            raise sec._fail(f"regions[{i}]", "width and height must be positive")
        regions.append(Region(*r))
    return tuple(regions)


def _safe_private(sec: Section) -> frozenset[tuple[str, int]]:
    """``safe_private = ["CREATOR:0xEE", ...]``: a private creator and an element byte."""
    kept = set()
    for i, entry in enumerate(sec.list("safe_private", str, [])):
        creator, sep, element = entry.rpartition(":")
        try:
            byte = int(element, 16)
        except ValueError:
            byte = -1
        if not sep or not creator.strip() or not 0 <= byte <= 0xFF:
            raise sec._fail(f"safe_private[{i}]", f"expected 'CREATOR:0xEE' (element byte 00-FF); got {entry!r}")
        kept.add((creator.strip(), byte))
    return frozenset(kept)


def parse_profile(raw: Mapping[str, Any], *, name: str = "profile", base_dir: str | Path | None = None,
                  source: Path | None = None) -> Profile:
    """Validate an already-parsed TOML document (see :func:`load_profile`)."""
    origin = str(source or name)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    top = dict(raw)

    def section(key: str) -> Section:
        if key not in top:
            raise ConfigError(f"{origin}: section [{key}] missing")
        return _section(origin, key, top.pop(key), base)

    s = section("device")
    device = DeviceConfig(s.str("id"), s.str("site"), s.str("group"), s.path("key", None))
    s.done()

    s = section("dicom")
    ae = _ae_title(s, "ae_title", s.str("ae_title"))
    port = s.int("port", lo=0, hi=65535)
    host = s.str("host", "0.0.0.0")
    callers = tuple(_ae_title(s, "allowed_calling_aets", c) if c != "*" else c
                    for c in s.list("allowed_calling_aets", str, min_len=1))
    dicom = DicomConfig(ae, port, host, callers, s.int("max_pdu", 16382, lo=0, hi=2**32 - 1),
                        s.int("max_associations", 10, lo=1, hi=1000))
    s.done()

    s = section("spool")
    spool = SpoolConfig(s.path("dir"), s.int("max_bytes", lo=1))
    s.done()

    s = section("deid")
    opts = _section(origin, "deid.options", s.table_of("options"), base)
    longitudinal = opts.bool("retain_longitudinal_modified_dates", False)
    characteristics = opts.bool("retain_patient_characteristics", False)
    descriptors = opts.bool("clean_descriptors", False)
    safe_private = _safe_private(opts)
    opts.done()
    b = _section(origin, "deid.burned_in", s.table_of("burned_in"), base)
    policy = BurnedInPolicy(
        b.str("policy", "quarantine", choices=("quarantine", "blank")),
        _regions(b),
        tuple(m.upper() for m in b.list("suspect_modalities", str, ["US", "SC", "XA", "ES", "OT"])),
        b.bool("detect_text", True),
    )
    if policy.action == "blank" and not policy.regions and not policy.detect_text:
        raise b._fail("regions", "policy 'blank' without detect_text needs at least one region")
    b.done()
    deid = DeidConfig(longitudinal, characteristics, s.str("patient_id_issuer"),
                      s.path("secret_path", None), policy, descriptors, safe_private,
                      s.str("mode", "allow-list", choices=("allow-list", "keep-unlisted")),
                      s.str("documents", "quarantine", choices=("quarantine", "dummy")))
    s.done()

    pre_tables = top.pop("preprocess", {})
    if not isinstance(pre_tables, dict):
        raise ConfigError(f"{origin}: [preprocess] must contain [preprocess.<MODALITY>] tables")
    preprocess = {}
    for modality, table in pre_tables.items():
        if modality not in MODALITIES:
            raise ConfigError(f"{origin}: [preprocess.{modality}] unknown modality; expected one of "
                              f"{', '.join(MODALITIES)}")
        p = _section(origin, f"preprocess.{modality}", table, base)
        size = p.list("target_size", int, min_len=2)
        window = p._take("window")
        if (len(size) != 2 or not all(0 < v <= 4096 for v in size)):
            raise p._fail("target_size", "expected [rows, columns], each 1..4096")
        if (not isinstance(window, list) or len(window) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in window)
                or not window[0] < window[1]):
            raise p._fail("window", "expected [low, high] numbers with low < high")
        preprocess[modality] = PreprocessConfig(
            modality, (size[0], size[1]), p.str("interpolation", choices=INTERPOLATIONS),
            (float(window[0]), float(window[1])), p.str("denoise", "none", choices=DENOISERS))
        p.done()

    s = section("inference")
    providers = tuple(s.list("execution_providers", str, min_len=1))
    for prov in providers:
        if prov not in KNOWN_PROVIDERS:
            raise s._fail("execution_providers", f"unknown provider {prov!r}; known: {', '.join(KNOWN_PROVIDERS)}")
    inference = InferenceConfig(providers, s.int("threads", lo=1, hi=256),
                                s.str("precision", choices=PRECISIONS), s.int("batch", lo=1, hi=1024),
                                s.path("models_dir", "models"))
    s.done()

    s = section("mqtt")
    tls_table = s.table_of("tls")
    tls = None
    if tls_table:
        t = _section(origin, "mqtt.tls", tls_table, base)
        tls = TlsConfig(t.path("ca"), t.path("cert"), t.path("key"))
        t.done()
    mqtt = MqttConfig(s.str("host"), s.int("port", lo=1, hi=65535), s.int("keepalive", 60, lo=5, hi=65535),
                      s.int("max_message_bytes", lo=1024), tls)
    s.done()

    s = section("outbox")
    outbox = OutboxConfig(s.path("path"), s.int("max_bytes", lo=1), s.int("max_count", lo=1),
                          s.int("min_disk_free_bytes", 64 * 1024**2, lo=0))
    s.done()

    s = _section(origin, "uplink", top.pop("uplink", {}), base)
    uplink = UplinkConfig(s.int("window", 32, lo=1, hi=10_000), s.num("resend_after_s", 30.0),
                          s.num("heartbeat_s", 30.0))
    if uplink.resend_after_s <= 0 or uplink.heartbeat_s <= 0:
        raise s._fail("resend_after_s", "resend_after_s and heartbeat_s must be positive")
    s.done()

    s = _section(origin, "cloud", top.pop("cloud", {}), base)
    cloud = CloudConfig(s.path("enrollment", None))
    s.done()

    s = section("records")
    records = RecordsConfig(s.path("path"))
    s.done()

    if top:
        raise ConfigError(f"{origin}: unknown section(s): {', '.join(sorted(top))}")
    return Profile(name, device, dicom, spool, deid, MappingProxyType(preprocess), inference, mqtt,
                   outbox, records, uplink, cloud, source)
