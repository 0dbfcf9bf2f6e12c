"""Authentication, authorization and the audit log of the control plane's API."""
