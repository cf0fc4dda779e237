# examples/myapp.py: a node defined once, served under any name
import zmqfabric as zf


def node(name: str = "thumbs") -> zf.Node:
    thumbs = zf.Node(name)                     # allocates only; start() or `with` opens it

    @thumbs.reply("thumbnail")                 # a request/reply service
    def thumbnail(req: dict) -> dict:
        return {"path": req["path"], "size": 128, "by": thumbs.name}

    @thumbs.task("resize")                     # a reliable task worker: acked when it returns
    def resize(job: dict) -> dict:
        return {"path": job["path"], "resized": True}

    return thumbs


if __name__ == "__main__":
    with node() as thumbs:                     # `with`: closed (goodbye said) on the way out
        thumbs.run()                           # serve until stop(), SIGINT or SIGTERM
