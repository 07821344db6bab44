"""The operator's PKI: CA, key pairs, CSRs, certificates, CRLs and their verification (``sealmq pki``)."""
