// Placeholder: main-thread fd readiness (eventfd, TAP) without a threadpool thread per fd. See README.
export {};
