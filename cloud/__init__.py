"""The cloud coordinator: ingest, off-chain store, fleet registry, custodian, training
orchestration and rollout. Never imports ``edge_agent``; shares only ``medchain.protocol``."""
