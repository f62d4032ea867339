"""The permissioned ledger and the trust primitives it is built on: Merkle trees,
canonical encoding, identities and signatures. Knows nothing of DICOM, MQTT or torch."""
