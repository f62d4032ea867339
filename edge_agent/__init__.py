"""The edge agent: a DICOM node beside the scanners that de-identifies, prepares, seals and
uplinks every image. Never imports ``cloud``; shares only ``medchain.protocol`` with it."""
