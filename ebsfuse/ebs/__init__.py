"""The EBS direct APIs: settings, errors, SigV4, the lean HTTP transport, the client, and the
checks every answer passes (a block's length and SHA-256, a listing page's shape) before any
layer above may believe it. Imports nothing from the layers above."""
