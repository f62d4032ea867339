"""MedChain's shared kernel: the exception root, the edge <-> cloud wire protocol and the
sealing recipe that both sides of the wire use. It knows nothing of DICOM, MQTT or torch."""

__version__ = "0.1.0"
