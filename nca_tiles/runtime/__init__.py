"""The process and its files: locks on outputs (``locking``), recognisable temporaries and atomic
outputs (``outputs``), pre-flight checks (``preflight``), the allocator (``memory``) and thread
shares (``threads``).
"""
