extern "C" int fptq_dummy() { return 1; }
