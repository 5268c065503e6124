// Machine lands here (lifecycle, vCPU workers). See packages/kernel/README.md.
export {};
