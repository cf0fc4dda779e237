# examples/web.py: a client; run it while examples/myapp.py serves
import zmqfabric as zf

with zf.Node("web") as web:
    reply = web.request("thumbnail", {"path": "a.png"}, timeout=2.0, retries=1)
    handle = web.submit("resize", {"path": "a.png"})          # returns at once
    print(reply, handle.result(timeout=10))                    # or ignore the result

    prices = web.publisher("prices")
    feed = web.subscribe("prices", topics=["EUR"])
    feed.wait_ready(timeout=2.0)               # connected to every publisher of "prices"
    prices.wait_subscribers(1, timeout=2.0)    # what is sent from now on reaches it
    prices.send("EURUSD", {"bid": 1.1})
    print(feed.recv(timeout=2.0))              # ('EURUSD', {'bid': 1.1})

    frames = web.puller("frames")
    out = web.pusher("frames")                 # round robin over every puller of "frames"
    out.wait_ready(timeout=2.0)
    out.send({"frame": 1})
    print(frames.recv(timeout=2.0))            # {'frame': 1}
