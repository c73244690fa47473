// What a web app on another origin does with picstream, for tests/integration/test_browser.py,
// which calls `window.client.*` through Playwright. The page never sees an API key: it is
// handed an upload token (minted by the app's backend, here the test) and signed links.
"use strict";

(() => {
  const statusLine = (text) => {
    document.getElementById("status").textContent = text;
  };

  // RFC 9457 problem of a failed request, as far as CORS lets the page read it.
  const problemOf = (error) => {
    const response = error.originalResponse || null;
    const problem = { message: String(error.message || error), status: 0, body: null };
    if (response) {
      problem.status = response.getStatus();
      try {
        problem.body = JSON.parse(response.getBody());
      } catch (_) {
        problem.body = response.getBody();
      }
    }
    return problem;
  };

  // tus-js-client's own retry rule (4xx is final but 409 and 423), recording each retry.
  const retried = (state) => (error) => {
    const status = error.originalResponse ? error.originalResponse.getStatus() : 0;
    state.retries.push(`${status} ${error.message}`);
    return !(status >= 400 && status < 500 && status !== 409 && status !== 423);
  };

  let openGate = null;
  const gate = new Promise((resolve) => {
    openGate = resolve;
  });

  const state = {
    uploadUrl: null, // where the upload lives (Location of the creation POST)
    image: null, // Picstream-Image of the last response that had one
    sent: 0,
    retries: [],
    held: false, // a PATCH is waiting at `holdAt` for release()
    done: false,
    error: null,
  };

  window.client = {
    state: () => state,

    // Start a tus upload of the file at `file` (a URL on this origin, fetched as a Blob) and
    // return at once; `state` tells how it goes. With `holdAt`, the first PATCH from that
    // offset on waits until release(), so a test can arm a fault before it is sent.
    start: async ({ endpoint, token, file, chunkSize, metadata, holdAt }) => {
      const blob = await (await fetch(file)).blob();
      const headers = token === null ? {} : { Authorization: `Bearer ${token}` };
      let passed = false;
      const upload = new tus.Upload(blob, {
        endpoint,
        headers,
        chunkSize,
        metadata,
        retryDelays: [0, 100, 200, 400, 800, 1000, 1000, 1000, 1000, 1000],
        removeFingerprintOnSuccess: true,
        onUploadUrlAvailable: () => {
          state.uploadUrl = upload.url;
        },
        onBeforeRequest: async (req) => {
          const offset = Number(req.getHeader("Upload-Offset"));
          if (holdAt != null && !passed && req.getMethod() === "PATCH" && offset >= holdAt) {
            state.held = true;
            await gate;
            passed = true;
          }
        },
        onAfterResponse: (req, res) => {
          const image = res.getHeader("Picstream-Image");
          if (image) state.image = image;
        },
        onShouldRetry: retried(state),
        onProgress: (sent, total) => {
          state.sent = sent;
          statusLine(`uploading: ${sent} of ${total} bytes`);
        },
        onSuccess: () => {
          state.done = true;
          statusLine("uploaded");
        },
        onError: (error) => {
          state.error = problemOf(error);
          statusLine(`failed: ${state.error.message}`);
        },
      });
      upload.start();
      return blob.size;
    },

    release: () => {
      openGate();
    },

    // Follow an image's events (a signed URL: EventSource cannot send a key) until a final
    // status; `events.opened` once the stream answered, `events.seen` the statuses so far.
    events: { opened: false, seen: [], final: null, failed: null },
    follow: (url) => {
      const events = window.client.events;
      const source = new EventSource(url);
      source.onopen = () => {
        events.opened = true;
      };
      source.addEventListener("status", (message) => {
        const data = JSON.parse(message.data);
        events.seen.push(data.status);
        if (data.status === "ready" || data.status === "failed") {
          source.close(); // else it reconnects, 2 s after the stream ends
          events.final = data;
        }
      });
      source.onerror = () => {
        // A CORS refusal (or any failed connection) closes it for good; a dropped stream
        // reconnects by itself.
        if (source.readyState === EventSource.CLOSED && events.final === null) {
          events.failed = "the event stream could not be opened";
        }
      };
      return true;
    },

    // Show an image from the API as an <img crossorigin="anonymous">, draw it on a canvas and
    // read the canvas back: that throws if the image was not served CORS-clean.
    draw: (url) =>
      new Promise((resolve, reject) => {
        const img = document.createElement("img");
        img.setAttribute("crossorigin", "anonymous");
        img.onload = () => {
          const canvas = document.createElement("canvas");
          canvas.width = img.naturalWidth;
          canvas.height = img.naturalHeight;
          const context = canvas.getContext("2d");
          context.drawImage(img, 0, 0);
          try {
            const data = canvas.toDataURL("image/png");
            const pixel = Array.from(context.getImageData(0, 0, 1, 1).data);
            resolve({ width: img.naturalWidth, height: img.naturalHeight, data: data.length, pixel });
          } catch (error) {
            reject(new Error(`the canvas is tainted: ${error}`));
          }
        };
        img.onerror = () => reject(new Error(`the image did not load: ${url}`));
        img.src = url;
        document.getElementById("images").append(img);
      }),

    // fetch() that reports instead of throwing: {ok, status, body} or {error}.
    fetch: async (url, init) => {
      try {
        const response = await fetch(url, init);
        return { status: response.status, body: await response.text() };
      } catch (error) {
        return { error: String(error) };
      }
    },
  };
})();
