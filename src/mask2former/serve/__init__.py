"""`mask2former serve`: an HTTP service and web page around a Predictor.

    app.py      the FastAPI application: endpoints, lifespan (model loading, draining)
    batcher.py  dynamic batching of concurrent requests into `Predictor.predict_batch` calls
    limits.py   upload bounds and decoding: every bad upload becomes an `UploadError` with its HTTP status
    encode.py   results -> JSON (COCO RLE masks), overlay PNG, panoptic / semantic PNG
    metrics.py  counters and histograms in the Prometheus text format
    memory.py   malloc settings that keep a long-running server's RSS flat
    client.py   a small standard-library client (tests, the load test)
    static/     the web page (plain HTML/JS/CSS, no build step)

FastAPI, uvicorn and python-multipart come with the `serve` extra; only app.py imports them.
"""
