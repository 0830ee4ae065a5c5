"""The kubetune operator: pure builders, thin kopf handlers."""
