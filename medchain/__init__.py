"""MedChain's kernel: what edge, cloud and ledger share and nothing else — the exception tree,
canonical encoding, Merkle trees, identities and signatures, sealing, the edge <-> cloud wire
protocol, the MQTT client wrapper, strict settings and crash-safe files. It imports nothing of
ours and knows nothing of DICOM or torch."""

__version__ = "0.1.0"
