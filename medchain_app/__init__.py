"""The application on top: the ``medchain`` command and the end-to-end demo. It imports every
package (kernel, ledger, edge, cloud, models, scanner simulator); none imports it."""
